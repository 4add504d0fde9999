"""Fault injection: preemption, kills, broken checkpoints, NaNs, bad configs and bad files.

Each test records (fault, survived, what was lost) in `conftest.FAULTS`; pytest prints the table
at the end of the run. Runs that are compared bit for bit all run as `brainlm-pretrain`
subprocesses on one CPU device (same backend set-up), or all in this process.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from brainlm_jax import checkpoint as ckpt_lib
from brainlm_jax import input_pipeline
from brainlm_jax import recordings as recordings_lib
from brainlm_jax import restore
from brainlm_jax import train
from brainlm_jax.cli import common
from tests.conftest import FAULTS, REPO, tiny_config

STEPS = 150  # long enough (several seconds) to be interrupted mid-run


def _record(fault, survived, lost="nothing"):
  FAULTS.append((fault, bool(survived), lost))


def _params(workdir, step=None):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step() if step is None else step
  out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return step, out["state"]["params"]


def _same(a, b) -> bool:
  return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))


# ----------------------------------------------------------------------------------------------
# Preemption and kills, through the real entrypoint.


def _overrides(hcp_dir, **extra):
  c = {"data.path": str(hcp_dir), "data.max_eval_windows": 8, "model.hidden_size": 32,
       "model.decoder_hidden_size": 32, "model.mlp_dim": 64, "model.decoder_mlp_dim": 64,
       "model.num_heads": 2, "model.decoder_num_heads": 2, "train.batch_size": 8,
       "train.eval_batch_size": 8, "train.num_steps": STEPS, "train.warmup_steps": 5,
       "train.log_every": 5, "train.eval_every": STEPS, "train.checkpoint_every": 25,
       "mesh.num_devices": 1}
  c.update(extra)
  return [f"--config.{k}={v}" for k, v in c.items()]


def _start(workdir, hcp_dir, log, **extra):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "brainlm_jax.cli.pretrain", "--config", "configs/pretrain.py:tiny",
         "--workdir", str(workdir), *_overrides(hcp_dir, **extra)]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=open(log, "w"))


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process exited ({proc.returncode}) before the expected moment")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def _run(workdir, hcp_dir, log):
  proc = _start(workdir, hcp_dir, log)
  assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]


@pytest.fixture(scope="module")
def reference(hcp_dir, tmp_path_factory):
  """An uninterrupted subprocess run: its final params are what every resumed run must reach."""
  workdir = tmp_path_factory.mktemp("reference")
  _run(workdir, hcp_dir, workdir / "log.txt")
  step, params = _params(str(workdir))
  assert step == STEPS
  return params


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes_bit_exact(reference, hcp_dir, tmp_path):
  log = tmp_path / "log.txt"
  proc = _start(tmp_path / "w", hcp_dir, log)
  _wait_for(lambda: f"step 10/{STEPS}" in open(log).read(), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=240) == 0
  text = open(log).read()
  assert "(SIGTERM); checkpoint saved. Resume with --workdir" in text
  stopped, _ = _params(str(tmp_path / "w"))
  assert 10 <= stopped < STEPS, stopped  # a checkpoint at the step it stopped, off the schedule
  _run(tmp_path / "w", hcp_dir, tmp_path / "log2.txt")
  step, params = _params(str(tmp_path / "w"))
  ok = step == STEPS and _same(params, reference)
  _record(f"SIGTERM at step {stopped}, then resume", ok)
  assert ok


@pytest.mark.slow
def test_sigkill_at_a_random_moment_resumes_bit_exact(reference, hcp_dir, tmp_path):
  log = tmp_path / "log.txt"
  proc = _start(tmp_path / "w", hcp_dir, log)
  ckpts = tmp_path / "w" / "checkpoints"
  _wait_for(lambda: ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts)), proc)
  time.sleep(random.Random().uniform(0.0, 1.5))  # anywhere: mid-step, mid-save, mid-log
  proc.kill()
  proc.wait()
  done = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  _run(tmp_path / "w", hcp_dir, tmp_path / "log2.txt")
  step, params = _params(str(tmp_path / "w"))
  ok = step == STEPS and _same(params, reference)
  _record(f"SIGKILL after checkpoints {done}, then resume", ok,
          f"steps after {done[-1]} recomputed")
  assert ok


# ----------------------------------------------------------------------------------------------
# Checkpoint safety.

_KILL_MID_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
from brainlm_jax import checkpoint, train
ckpt = checkpoint.Checkpointer(sys.argv[1], async_save=True)
def state(n, v):
  return train.TrainState(step=jnp.asarray(n, jnp.int32), params={"w": jnp.full((n,), v)},
                          opt_state={}, rng=jax.random.PRNGKey(0))
ckpt.save(1, state(1000, 1.0), {"note": "good"})
ckpt.wait()
ckpt.save(2, state(60_000_000, 2.0), {"note": "big"})  # ~240 MB, written in the background
print("saving", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_in_the_middle_of_an_async_save(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(tmp_path / "c")], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == -signal.SIGKILL and "saving" in r.stdout, r.stderr[-2000:]
  leftovers = [n for n in os.listdir(tmp_path / "c") if not n.isdigit()]
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"), async_save=False)
  latest = ckpt.latest_step()
  out = ckpt.manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
  ckpt.close()
  expected = {1: (1000, 1.0, "good"), 2: (60_000_000, 2.0, "big")}[latest]
  w = np.asarray(out["state"]["params"]["w"])
  ok = (w.shape == (expected[0],) and np.all(w == expected[1])
        and out["meta"]["note"] == expected[2])
  _record(f"SIGKILL during an async save (latest readable: {latest}, partial dirs: "
          f"{len(leftovers)})", ok, "the unfinished save" if latest == 1 else "nothing")
  assert ok
  # A partial directory is never taken for a step.
  shutil.copytree(tmp_path / "c" / "1", tmp_path / "c" / "3.orbax-checkpoint-tmp-1234")
  assert ckpt_lib.Checkpointer(str(tmp_path / "c"), async_save=False).latest_step() == latest


def _corrupt(step_dir):
  """Overwrites every array data file of a step's state with garbage of the same size."""
  hit = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      with open(p, "wb") as fh:
        fh.write(b"\x00garbage" * (size // 8 + 1))
      hit += 1
  assert hit


def test_corrupted_checkpoint_falls_back_to_the_previous_one(hcp_dir, tmp_path):
  config = tiny_config(hcp_dir, steps=20)
  config.train.checkpoint_every = 5
  config.train.eval_every = 1000
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(config, workdir)
  _, params_20 = _params(workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "20"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/20/state"):
    restore.load_pretrained(workdir)  # probing names the broken directory

  train.train_and_evaluate(config, workdir)  # resumes from 15 and recomputes 16..20
  step, params = _params(workdir)
  kept = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
  report = json.load(open(os.path.join(workdir, "checkpoints_unreadable", kept[0],
                                       "UNREADABLE.json")))
  ok = step == 20 and _same(params, params_20) and report["step"] == 20
  _record("corrupted latest checkpoint", ok, "nothing (set aside, steps 16-20 recomputed)")
  assert ok


def test_checkpoint_of_another_model_names_the_keys(hcp_dir, tmp_path):
  config = tiny_config(hcp_dir, steps=2)
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(config, workdir)
  other = tiny_config(hcp_dir, steps=2)
  other.model.decoder_hidden_size = 16
  with pytest.raises(ValueError, match="model.decoder_hidden_size: checkpoint 32 vs now 16"):
    train.train_and_evaluate(other, workdir)
  pre = restore.load_pretrained(workdir)
  cfg = pre.model_cfg.__class__(**{**pre.model_cfg.__dict__, "num_layers": 3})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"encoder/layer_2/.*missing from the checkpoint"):
    restore.load_pretrained(workdir, model_cfg=cfg)
  _record("checkpoint of another model shape/config", True)


# ----------------------------------------------------------------------------------------------
# Numerical faults.


def _poison(monkeypatch, bad_step):
  """Makes the training batch of step `bad_step` (1-based) NaN."""
  original = input_pipeline.train_dataset

  def poisoned(*args, **kwargs):
    ds = original(*args, **kwargs)
    first = kwargs["start_step"]

    def f(i, batch):
      batch = dict(batch)
      bad = tf.equal(i + first + 1, bad_step)
      batch["signal"] = tf.where(bad, batch["signal"] * np.nan, batch["signal"])
      return batch
    return ds.enumerate().map(f)
  monkeypatch.setattr(input_pipeline, "train_dataset", poisoned)


def test_nonfinite_update_is_skipped_and_named(hcp_dir, tmp_path, monkeypatch, caplog):
  _poison(monkeypatch, bad_step=7)
  config = tiny_config(hcp_dir, steps=12)
  config.train.log_every = 5
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(config, workdir)
  warnings = [r.getMessage() for r in caplog.records if "NaN/inf" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("step 7: NaN/inf"), warnings
  assert "_REST1_LR.mat[t=" in warnings[0]  # the windows of the bad batch are named
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["skipped_updates"] for r in rows if "skipped_updates" in r] == [0, 1, 1]
  _, params = _params(workdir)
  ok = all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  _record("NaN batch at step 7 (on_nonfinite=skip)", ok, "one update (skipped, reported)")
  assert ok


def test_nonfinite_stop_keeps_the_last_finite_checkpoint(hcp_dir, tmp_path, monkeypatch):
  _poison(monkeypatch, bad_step=7)
  config = tiny_config(hcp_dir, steps=12)
  config.train.on_nonfinite = "stop"
  config.train.checkpoint_every = 5
  config.train.log_every = 5
  workdir = str(tmp_path / "w")
  with pytest.raises(train.NonFiniteError, match=r"^step 7: NaN/inf"):
    train.train_and_evaluate(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = ckpt.all_steps()
  ckpt.close()
  _, params = _params(workdir)
  ok = steps == [5] and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  _record("NaN batch at step 7 (on_nonfinite=stop)", ok, "steps 6-7 (stopped before saving)")
  assert ok


def test_train_step_never_applies_a_nonfinite_update():
  config = tiny_config("unused", steps=10)
  mcfg = train.model_config(config, num_parcels=6, has_coords=False)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp",
                                                                          "tensor"))
  tx = train.make_optimizer(config.train)
  state, _ = train.create_train_state(mcfg, tx, mesh, seed=0)
  step = jax.jit(lambda s, b: train.train_step(
      s, b, None, model=train.BrainLM(mcfg), tx=tx, mask_cfg=config.masking, loss_kind="mse",
      accum_steps=1))
  signal = np.full((2, 6, config.data.window), np.inf, np.float32)
  new, m = step(state, {"signal": signal})
  assert float(m["nonfinite"]) == 1.0 and int(new.step) == 1
  assert _same(new.params, state.params) and _same(new.opt_state, state.opt_state)


# ----------------------------------------------------------------------------------------------
# Config and input faults: one clear message each, before anything is compiled.


@pytest.mark.parametrize("override,message", [
    ({"mesh.data": 3, "mesh.fsdp": -1, "mesh.num_devices": 8}, "does not divide 8 devices"),
    ({"train.batch_size": 6, "mesh.data": 4, "mesh.num_devices": 4},
     "train.batch_size=6 does not divide across the data x fsdp axes"),
    ({"data.window": 210}, "data.window=210 is not divisible by model.patch_len=20"),
    ({"train.on_nonfinite": "ignore"}, "train.on_nonfinite='ignore'"),
    ({"masking.ratio": 1.0}, "mask ratio must be in [0, 1)"),
])
def test_config_faults_fail_before_compiling(override, message, tmp_path):
  config = tiny_config("never-read")
  for k, v in override.items():
    section, key = k.split(".")
    config[section][key] = v
  with pytest.raises(ValueError, match=r"Invalid config:[\s\S]*" + re.escape(message)):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  _record(f"config: {', '.join(f'{k}={v}' for k, v in override.items())}", True)


def test_unknown_config_key_is_named(monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit, match="unknown config key 'train.learning_rat'"):
    common.check_config_overrides(["prog", "--config", "configs/pretrain.py:tiny",
                                   "--config.train.learning_rat=1"])
  _record("config: unknown key train.learning_rat", True)


class _Exploit:
  def __reduce__(self):
    return (os.system, (f"touch {os.environ.get('BRAINLM_PWNED', '/tmp/brainlm_pwned')}",))


def test_input_faults_are_skipped_and_named(hcp_dir, tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  for f in sorted(hcp_dir.glob("*.mat"))[:3]:
    os.symlink(f, data / f.name)
  rng = np.random.default_rng(0)
  good = rng.standard_normal((300, 94)).astype(np.float32)
  np.save(data / "sub-ok_bold.npy", good)
  bad = {
      "sub-inf_bold.npy": "inf",
      "sub-short_bold.npy": "shorter than window",
      "sub-flat_bold.npy": "constant",
      "sub-3d_bold.npy": "2-D",
      "sub-trunc_bold.npy": "",
      "sub-pickle_bold.npy": "pickle",
      "sub-empty_bold.csv": "",
  }
  inf = good.copy()
  inf[5, 5] = np.inf
  np.save(data / "sub-inf_bold.npy", inf)
  np.save(data / "sub-short_bold.npy", good[:50])
  flat = good.copy()
  flat[:, 7] = 3.0
  np.save(data / "sub-flat_bold.npy", flat)
  np.save(data / "sub-3d_bold.npy", good.reshape(300, 2, 47))
  raw = (data / "sub-ok_bold.npy").read_bytes()
  (data / "sub-trunc_bold.npy").write_bytes(raw[:len(raw) // 3])
  pwned = tmp_path / "pwned"
  monkeypatch.setenv("BRAINLM_PWNED", str(pwned))
  np.save(data / "sub-pickle_bold.npy", np.array([_Exploit()], dtype=object), allow_pickle=True)
  (data / "sub-empty_bold.csv").write_text("")

  recs, skipped = recordings_lib.load_recordings(str(data), window=200, num_parcels=94)
  reasons = {os.path.basename(s["path"]): s["reason"] for s in skipped}
  assert set(reasons) == set(bad), reasons
  for name, words in bad.items():
    assert reasons[name].startswith(str(data / name)), reasons[name]  # names the file
    assert words.lower() in reasons[name].lower(), (name, reasons[name])
  assert not pwned.exists()  # the pickle was refused, never executed
  assert len(recs) == 4
  for name in bad:
    _record(f"input: {name}", True, "that file (skipped, listed)")


def test_no_code_executing_loaders_in_the_package():
  """User files are read with data-only loaders (no pickle, torch.load only weights_only)."""
  offenders = []
  for top in ("brainlm_jax", "data_pipelines"):
    for root, _, files in os.walk(REPO / top):
      for f in files:
        if not f.endswith(".py"):
          continue
        text = open(os.path.join(root, f), encoding="utf-8").read()
        for pattern in (r"allow_pickle\s*=\s*True", r"\bpickle\.loads?\(", r"\bdill\b",
                        r"torch\.load\((?![^)]*weights_only\s*=\s*True)", r"\beval\(",
                        r"np\.load\((?![^)]*allow_pickle\s*=\s*False)"):
          if re.search(pattern, text):
            offenders.append(f"{os.path.join(root, f)}: {pattern}")
  assert not offenders, offenders
