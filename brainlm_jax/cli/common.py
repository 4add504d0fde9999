"""Runtime set-up shared by the entrypoints."""

from absl import logging


def setup_runtime():
  """Keeps TensorFlow (tf.data only) off the accelerators; starts jax.distributed when launched
  as one of several processes (TPU VM, SLURM, or explicit coordinator env vars)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None
  import jax  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1" \
      or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
