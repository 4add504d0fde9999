"""What every entrypoint shares: one flag vocabulary, runtime set-up, clear errors.

  _F = define_flags(__name__, "checkpoint", "out", "data", "split", batch_size=16)
  def main(argv): start(argv); ...
  def run(): run_entrypoint(main, "brainlm-probe", _F.values())

Flag vocabulary (`FLAG_SPECS`): --checkpoint (a pretraining run to read), --out (a job's output
directory; training jobs that resume take --workdir), --data, --split, --step, --seed,
--batch-size, --phenotypes, --subject-column, --subject-pattern, --mask-ratio; --config is always
a config file (configs/*.py:PRESET). Every multi-word flag is spelled with hyphens and has an
underscore alias.
"""

import logging as std_logging
import os

from absl import flags
from absl import logging

_NOISY = ("/orbax/", "/tensorflow/", "/tensorflow_datasets/", "/jax/_src/distributed",
          "/jax/_src/xla_bridge")  # e.g. "Unable to initialize backend 'tpu'" on every CPU run


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
  """Adds our XLA:CPU flags to XLA_FLAGS (before JAX starts its backends); user flags win. With
  the TPU runtime installed on a machine without TPUs, keeps its start-up warnings quiet."""
  from brainlm_jax.tools import tpu  # pylint: disable=import-outside-toplevel
  tpu.quiet_libtpu_env()
  flags = os.environ.get("XLA_FLAGS", "")
  for f in CPU_XLA_FLAGS:
    if f.split("=")[0] not in flags:
      flags = f"{flags} {f}".strip()
  os.environ["XLA_FLAGS"] = flags


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator (multi-process runs without a cluster manager); "
    "default: $JAX_COORDINATOR_ADDRESS or auto-detected on TPU VMs, SLURM and GKE.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Processes in the job (with --coordinator_address); default: $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes); default: $JAX_PROCESS_ID.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: start jax.distributed when the flags above or a cluster environment (SLURM job with "
    "several tasks, TPU pod / GKE worker list, Open MPI) say this is one of several processes; "
    "on: always (JAX auto-detects the cluster, e.g. on a Cloud TPU VM); off: never.")
DISTRIBUTED_FLAGS = (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _DISTRIBUTED)

# Environment variables that mark one process of a multi-process job (what JAX's cluster
# detection reads: SLURM, Cloud TPU pods / GKE, Open MPI), with the value meaning "alone".
_CLUSTER_ENV = (("SLURM_NTASKS", "1"), ("TPU_WORKER_HOSTNAMES", ""),
                ("OMPI_COMM_WORLD_SIZE", "1"), ("JAX_COORDINATOR_ADDRESS", ""))


def _env_int(environ, var: str) -> int | None:
  value = environ.get(var, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${var}={value!r} is not an integer") from None


def distributed_args(coordinator_address=None, num_processes=None, process_id=None,
                     mode="auto", environ=None) -> dict | None:
  """kwargs for `jax.distributed.initialize`, or None when this is a single-process run.

  Explicit values (flags, else $JAX_NUM_PROCESSES / $JAX_PROCESS_ID; JAX itself reads
  $JAX_COORDINATOR_ADDRESS) win; `mode='auto'` otherwise starts only in a multi-process cluster
  environment (then JAX detects the coordinator, process count and index itself).
  """
  environ = os.environ if environ is None else environ
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}; expected auto | on | off")
  if mode == "off":
    return None
  if num_processes is None:
    num_processes = _env_int(environ, "JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int(environ, "JAX_PROCESS_ID")
  explicit = {k: v for k, v in (("coordinator_address", coordinator_address),
                                ("num_processes", num_processes),
                                ("process_id", process_id)) if v is not None}
  if explicit:
    missing = {"coordinator_address", "num_processes", "process_id"} - set(explicit)
    if missing and "coordinator_address" in explicit:
      raise ValueError(f"--coordinator_address needs --{' and --'.join(sorted(missing))} too")
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"--num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    return explicit
  in_cluster = any(environ.get(var, alone) not in (alone, "") for var, alone in _CLUSTER_ENV
                   if var != "TPU_WORKER_HOSTNAMES")
  in_cluster |= "," in environ.get("TPU_WORKER_HOSTNAMES", "")  # one host name: a lone worker
  return {} if mode == "on" or in_cluster else None


def init_distributed(**kw) -> bool:
  """Starts jax.distributed if `distributed_args(**kw)` says so. Returns whether it did."""
  import jax  # pylint: disable=import-outside-toplevel
  args = distributed_args(**kw)
  if args is None:
    return False
  logging.info("Starting jax.distributed (%s)", ", ".join(f"{k}={v}" for k, v in args.items())
               or "cluster auto-detection")
  jax.distributed.initialize(**args)
  return True


def setup_runtime():
  """Keeps TensorFlow (tf.data only) off the accelerators, quiets library logs, starts
  jax.distributed when this is one of several processes (--coordinator_address/--num_processes/
  --process_id, or a TPU pod, SLURM or GKE environment), and leaves INFO logs to process 0."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  configure_xla_flags()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
  except ImportError:  # the training step, model and benchmark run without TensorFlow
    pass
  import jax  # pylint: disable=import-outside-toplevel
  parsed = flags.FLAGS.is_parsed()
  init_distributed(
      coordinator_address=_COORDINATOR.value if parsed else None,
      num_processes=_NUM_PROCESSES.value if parsed else None,
      process_id=_PROCESS_ID.value if parsed else None,
      mode=_DISTRIBUTED.value if parsed else "auto")
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  if jax.process_index() > 0:  # one readable log: the other hosts report warnings and errors
    logging.set_verbosity(logging.WARNING)


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


FLAG_SPECS = {
    "checkpoint": ("string", None, "Pretraining WORKDIR (its latest checkpoint) or "
                   "WORKDIR/checkpoints/STEP."),
    "out": ("string", None, "Output directory."),
    "data": ("string", None, "Recordings (dir, glob or file) or a prepared TFDS dataset; default: "
             "the checkpoint's data.path."),
    "split": ("enum", "auto", "Which recordings of the data: all, or the pretraining run's train "
              "/ validation subjects; auto: the job's default (validation for evaluate and visualize on the run's own data, "
              "else all)."),
    "step": ("integer", None, "Checkpoint step (default: the latest)."),
    "seed": ("integer", 0, "Seed (folds, masks, random-init encoder)."),
    "batch-size": ("integer", 16, "Windows per model call."),
    "phenotypes": ("string", None, "CSV/TSV with one row per subject."),
    "subject-column": ("string", "participant_id", "Subject id column of --phenotypes."),
    "subject-pattern": ("string", None, "Regex whose first group is the subject id in a "
                        "recording's file name, e.g. '^([^_]+_[^_]+)' for NAP_001_rest.mat; "
                        "default: the checkpoint's data.subject_pattern (a cohort table's "
                        "subject column wins)."),
    "mask-ratio": ("float", None, "Mask ratio (default: the run's masking.ratio)."),
    "workdir": ("string", None, "Run directory (checkpoints, metrics, logs): a local path or a "
                "bucket, gs://BUCKET/PATH; the same command resumes there."),
}
SPLIT_CHOICES = ("auto", "all", "train", "validation")


def define_flags(module: str, *names: str, help_text: dict | None = None,
                 **defaults) -> dict[str, flags.FlagHolder]:
  """Defines the named flags of FLAG_SPECS for `module` (the calling CLI's __name__), with its
  `defaults` (keys with underscores) and help overrides, and an underscore alias for each
  hyphenated name. Returns {name: FlagHolder}."""
  help_text = help_text or {}
  out = {}
  for name in names:
    kind, default, text = FLAG_SPECS[name]
    default = defaults.get(name.replace("-", "_"), default)
    text = help_text.get(name, text)
    kw = {"module_name": module}
    if kind == "enum":
      out[name] = flags.DEFINE_enum(name, default, SPLIT_CHOICES, text, **kw)
    else:
      out[name] = getattr(flags, f"DEFINE_{kind}")(name, default, text, **kw)
  underscore_aliases(module, *(n for n in names if "-" in n))
  return out


def underscore_aliases(module: str, *names: str, required: tuple[str, ...] = ()) -> None:
  """An underscore alias (--hf_dir) for each hyphenated flag (--hf-dir) of `module` (the calling
  CLI's __name__); `required`: flags the CLI cannot run without."""
  for name in names:
    flags.DEFINE_alias(name.replace("-", "_"), name, module_name=module)
  if required:
    flags.mark_flags_as_required(list(required))


def start(argv) -> None:
  """The first line of every CLI's main: no stray arguments, then the runtime set-up."""
  no_extra_args(argv)
  setup_runtime()


def no_extra_args(argv) -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")


def run_entrypoint(main, name: str, key_flags=()):
  """`app.run` of a console script's main with clear errors (config-file overrides are checked
  first); `key_flags` are listed first in its --help (absl otherwise files them under the
  defining module)."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import app  # pylint: disable=import-outside-toplevel
  check_config_overrides(sys.argv)
  for flag in key_flags:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag.name])
  app.run(main_with_clear_errors(main, name))


def main_with_clear_errors(main, name: str):
  """Wraps an absl main: expected user errors print one line and exit 1 (BRAINLM_TRACEBACK=1
  re-raises them with the traceback). They include a workdir or output directory that cannot be
  written or read, local or in a bucket (`storage.StorageError`, tf.io.gfile's errors)."""
  # pylint: disable=import-outside-toplevel
  from brainlm_jax.data.readers import RecordingError
  from brainlm_jax.training import storage
  from brainlm_jax.training.checkpoint import CheckpointError
  from brainlm_jax.training.loop import NonFiniteError
  expected = (FileNotFoundError, RecordingError, CheckpointError, NonFiniteError, MemoryError,
              ValueError, storage.StorageError)

  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      tf_error = storage.is_io_error(e) and not isinstance(e, OSError)  # tf.errors.OpError
      if not (isinstance(e, expected) or tf_error) or os.environ.get("BRAINLM_TRACEBACK"):
        raise
      logging.error("%s: %s", type(e).__name__, e)
      raise SystemExit(f"{name}: error: {e}") from None
  return wrapped


def run_evaluator(evaluator, checkpoint: str, step: int | None, out: str) -> dict:
  """Restores `checkpoint` (params only), runs the transfer `evaluator` into `out`, prints its
  description and logs the report's files. Returns the results."""
  # pylint: disable=import-outside-toplevel
  import jax
  from brainlm_jax.transfer.run import load_pretrained
  results = evaluator.run(load_pretrained(checkpoint, step=step), out)
  if jax.process_index() == 0:
    print(f"\n{evaluator.describe(results)}")
    logging.info("Wrote %s", ", ".join(results["report"].values()))
  return results
