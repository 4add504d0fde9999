"""Runtime set-up shared by the entrypoints."""

import logging as std_logging
import os

from absl import logging

_NOISY = ("/orbax/", "/tensorflow/", "/tensorflow_datasets/", "/jax/_src/distributed")


class _QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (Orbax logs ~30 lines per save) out of the run's log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in _NOISY)


def setup_runtime():
  """Keeps TensorFlow (tf.data only) off the accelerators, quiets library logs, and starts
  jax.distributed when launched as one of several processes (TPU VM, SLURM, or explicit
  coordinator environment variables)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=import-outside-toplevel
  if (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1"
      or os.environ.get("TPU_WORKER_HOSTNAMES")):
    jax.distributed.initialize()
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
