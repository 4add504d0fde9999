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


# XLA:CPU's concurrency-optimised scheduler keeps many [batch, tokens, mlp] buffers alive at once:
# on the 13m train step it raised XLA's temp memory from 2.9 GB to 4.2 GB for no speed gain
# (benchmarks/train_step.py). Only the CPU backend reads this flag.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def configure_xla_flags():
  """Adds our XLA:CPU flags to XLA_FLAGS (before JAX starts its backends); user flags win."""
  flags = os.environ.get("XLA_FLAGS", "")
  for f in CPU_XLA_FLAGS:
    if f.split("=")[0] not in flags:
      flags = f"{flags} {f}".strip()
  os.environ["XLA_FLAGS"] = flags


def setup_runtime():
  """Keeps TensorFlow (tf.data only) off the accelerators, quiets library logs, and starts
  jax.distributed when launched as one of several processes (TPU VM, SLURM, or explicit
  coordinator environment variables)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  configure_xla_flags()
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


def _load_config_file(spec: str):
  """`path/to/file.py[:ARG]` -> the ConfigDict its get_config(ARG) returns."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location("_brainlm_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_overrides(argv, flag: str = "config") -> None:
  """Fails fast, with one line naming the key, on `--config.x.y=...` keys the preset lacks.

  (ml_collections raises the same as three chained tracebacks deep inside flag parsing.)
  """
  spec, overrides = None, []
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith(f"--{flag}="):
      spec = a.split("=", 1)[1]
    elif a == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith(f"--{flag}."):
      overrides.append(a[len(flag) + 3:].split("=", 1)[0])
  if spec is None or not overrides:
    return
  config = _load_config_file(spec)
  for key in overrides:
    node, walked = config, []
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        where = ".".join(walked) or "the top level"
        raise SystemExit(f"error: unknown config key '{key}': '{part}' is not in {where} of "
                         f"{spec}. Known keys there: {', '.join(known)}")
      node, walked = node[part], walked + [part]


def main_with_clear_errors(main, name: str):
  """Wraps an absl main: expected user errors print one line and exit 1 (BRAINLM_TRACEBACK=1
  re-raises them with the traceback)."""
  from brainlm_jax.recordings import RecordingError  # pylint: disable=import-outside-toplevel
  from brainlm_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel

  def wrapped(argv):
    try:
      return main(argv)
    except (FileNotFoundError, RecordingError, CheckpointError, ValueError) as e:
      if os.environ.get("BRAINLM_TRACEBACK"):
        raise
      logging.error("%s: %s", type(e).__name__, e)
      raise SystemExit(f"{name}: error: {e}") from None
  return wrapped
