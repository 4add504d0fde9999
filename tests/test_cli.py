"""The entrypoint's answers to bad input: one clear line naming the key or file, non-zero exit."""

import json
import os
import subprocess
import sys

import numpy as np

from brainlm_jax.training import pretrain as pretrain_lib
from configs import pretrain
from tests.conftest import REPO, linked_recordings


def _cli(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "brainlm_jax.cli.pretrain", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300)


def test_unknown_config_key_names_the_key(tmp_path):
  r = _cli("--config", "configs/pretrain.py:tiny", "--workdir", str(tmp_path),
           "--config.train.bogus_key=3")
  assert r.returncode != 0
  assert "unknown config key 'train.bogus_key'" in r.stderr
  assert "learning_rate" in r.stderr  # lists what exists


def test_missing_data_folder_names_the_folder(tmp_path):
  r = _cli("--config", "configs/pretrain.py:tiny", "--workdir", str(tmp_path / "w"),
           f"--config.data.path={tmp_path / 'no_such_dir'}")
  assert r.returncode == 1
  assert f"brainlm-pretrain: error: {tmp_path / 'no_such_dir'}" in r.stderr


def test_bad_recordings_are_skipped_and_listed(hcp_dir, tmp_path):
  data = linked_recordings(hcp_dir, tmp_path / "data", 4)
  good = np.random.default_rng(0).standard_normal((300, 94)).astype(np.float32)
  nan = good.copy()
  nan[10, 3] = np.nan
  np.save(data / "sub-nan_bold.npy", nan)
  np.save(data / "sub-wrongshape_bold.npy", good[:, :50])  # 50 parcels, not 94
  (data / "sub-garbage_bold.csv").write_text("a,b\nx,y\n")
  c = pretrain.get_config("tiny")
  c.data.path = str(data)
  c.data.max_eval_windows = 8
  c.train.batch_size = c.train.eval_batch_size = 8
  c.train.num_steps = 2
  c.mesh.num_devices = 1
  c.train.async_checkpoints = False
  pretrain_lib.train_and_evaluate(c, str(tmp_path / "w"))
  report = json.load(open(tmp_path / "w" / "data_report.json"))
  skipped = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
  assert set(skipped) == {"sub-nan_bold.npy", "sub-wrongshape_bold.npy", "sub-garbage_bold.csv"}
  assert "NaN" in skipped["sub-nan_bold.npy"]
  assert "50" in skipped["sub-wrongshape_bold.npy"]
  assert len(report["train"]) + len(report["validation"]) == 4


def test_transfer_clis_take_a_subject_pattern(tmp_path):
  """--subject-pattern (and --subject_pattern) of every transfer CLI reaches its job, which
  checks the regex before reading the checkpoint: one error line."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  common = [f"--checkpoint={tmp_path / 'no_run'}", "--subject_pattern=("]
  for cli, args in (("probe", ["--target=subject-id", f"--out={tmp_path}"]),
                    ("evaluate", [f"--out={tmp_path}"]), ("visualize", [f"--out={tmp_path}"]),
                    ("finetune", ["--config=configs/finetune.py:tiny",
                                  f"--workdir={tmp_path}"])):
    r = subprocess.run([sys.executable, "-m", f"brainlm_jax.cli.{cli}", *common, *args],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, (cli, r.stderr[-2000:])
    assert f"brainlm-{cli}: error: subject pattern '(' is not a regex" in r.stderr, cli


def test_probe_readings_help_names_the_real_defaults():
  """`brainlm-probe --help` lists every reading and states the defaults the probe really uses."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from brainlm_jax.cli import probe as probe_cli  # pylint: disable=import-outside-toplevel,unused-import
  from brainlm_jax.transfer import features, probe  # pylint: disable=import-outside-toplevel
  text = flags.FLAGS["readings"].help
  assert all(r in text for r in features.READINGS)
  for scheme in ("subject", "cohort"):
    assert ",".join(probe.DEFAULT_READINGS[scheme]) in text.replace(" ", "")
