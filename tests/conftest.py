"""Shared test set-up: 8 virtual CPU devices (sharding tests), quiet TF, the real data paths."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import importlib  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for this test session, shared with the CLI subprocesses (they
# inherit the environment): many tests compile the same tiny train step. Fresh per session, so
# no stale executables; removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="brainlm-jax-test-cache-")
  atexit.register(shutil.rmtree, _CACHE, True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HCP_DIR = SHARED_DATA / "hcp_rest_aal94"
A424_COORDS = SHARED_DATA / "atlases" / "A424" / "A424_Coordinates.dat"


@pytest.fixture(scope="session")
def hcp_dir():
  if not HCP_DIR.is_dir():
    pytest.skip(f"real data not found at {HCP_DIR}")
  return HCP_DIR


def linked_recordings(hcp_dir, folder, n):
  """`folder` (created) holding links to the first `n` real HCP recordings; returns it."""
  folder.mkdir()
  for f in sorted(hcp_dir.glob("*.mat"))[:n]:
    os.symlink(f, folder / f.name)
  return folder


def shrink_model(c, width, num_layers=None):
  """Config `c` with encoder and decoder `width` wide (MLP 2x, 2 heads; `num_layers` blocks)."""
  c.model.hidden_size = c.model.decoder_hidden_size = width
  c.model.mlp_dim = c.model.decoder_mlp_dim = 2 * width
  c.model.num_heads = c.model.decoder_num_heads = 2
  if num_layers is not None:
    c.model.num_layers = num_layers
  return c


def tiny_config(data_path, steps=40):
  """The `tiny` preset shrunk further (32-wide) for tests: one device, sync checkpoints."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config("tiny")
  c.data.path = str(data_path)
  c.data.max_eval_windows = 24
  shrink_model(c, 32)
  c.train.batch_size = c.train.eval_batch_size = 8
  c.train.num_steps = steps
  c.train.warmup_steps = 5
  c.train.learning_rate = 3e-3
  c.train.log_every = 10
  c.train.eval_every = steps
  c.train.checkpoint_every = 1000
  c.train.async_checkpoints = False
  c.mesh.num_devices = 1  # one device: bit-exact comparisons
  return c


def run_cli(name, argv):
  """Runs `brainlm_jax.cli.<name>.main` in-process with `argv` (argv[0] is the program name).

  absl flags are process-global and the CLIs share names (--checkpoint, --out, ...), as separate
  console scripts may; so the flags of any other CLI imported earlier are removed first, and
  the flag values are restored afterwards.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  keep = {f"brainlm_jax.cli.{name}", "brainlm_jax.cli.common"}
  for mod in [m for m in sys.modules if m.startswith("brainlm_jax.cli.") and m not in keep]:
    for fl in flags.FLAGS.get_flags_for_module(mod):
      if fl.name in flags.FLAGS:
        delattr(flags.FLAGS, fl.name)
    del sys.modules[mod]
  cli = importlib.import_module(f"brainlm_jax.cli.{name}")
  xla_flags = os.environ.get("XLA_FLAGS")  # main() may add its XLA:CPU flags for subprocesses
  try:
    with flagsaver.flagsaver():
      return cli.main(flags.FLAGS(list(argv))[:1])
  finally:
    os.environ["XLA_FLAGS"] = xla_flags


def run_cli_report(name, argv, capsys):
  """run_cli of a transfer CLI, then (what it printed, its report: OUT/NAME.json of --out=OUT)."""
  run_cli(name, argv)
  out = next(a.split("=", 1)[1] for a in argv if a.startswith("--out="))
  with open(os.path.join(out, f"{name}.json"), encoding="utf-8") as f:
    return capsys.readouterr().out, json.load(f)


# Fault-injection outcomes (tests/test_faults.py), printed as a table at the end of the run.
FAULTS = []


def pytest_terminal_summary(terminalreporter):
  if not FAULTS:
    return
  w = max(len(f[0]) for f in FAULTS)
  terminalreporter.section("faults tried")
  terminalreporter.write_line(f"{'fault':<{w}}  survived  lost")
  for fault, survived, lost in FAULTS:
    terminalreporter.write_line(f"{fault:<{w}}  {'yes' if survived else 'NO':<8}  {lost}")
