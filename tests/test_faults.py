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

from brainlm_jax.cli import common
from brainlm_jax.data import datasets
from brainlm_jax.data import input_pipeline
from brainlm_jax.models import build_model
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import state as state_lib
from brainlm_jax.training import steps as steps_lib
from brainlm_jax.training.loop import NonFiniteError
from brainlm_jax.training.pretrain import train_and_evaluate
from brainlm_jax.transfer.run import load_pretrained
from tests.conftest import FAULTS, REPO, linked_recordings, tiny_config

STEPS = 150  # long enough (several seconds) to be interrupted mid-run


def _record(fault, survived, lost="nothing"):
  FAULTS.append((fault, bool(survived), lost))


def _state(workdir, step=None):
  """(step, the whole saved TrainState as a dict: step, params, opt_state, rng)."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step() if step is None else step
  out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return step, out["state"]


def _params(workdir, step=None):
  step, state = _state(workdir, step)
  return step, state["params"]


def _steps(workdir):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = ckpt.all_steps()
  ckpt.close()
  return sorted(steps)


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


def _popen(cli, args, log):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", f"brainlm_jax.cli.{cli}", *args], cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _start(workdir, hcp_dir, log, **extra):
  return _popen("pretrain", ["--config", "configs/pretrain.py:tiny", "--workdir", str(workdir),
                             *_overrides(hcp_dir, **extra)], log)


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


def _resumed_equals(reference, workdir, hcp_dir, log) -> bool:
  """Runs the same command again in `workdir`: does it finish with the reference's params?"""
  _run(workdir, hcp_dir, log)
  step, params = _params(str(workdir))
  return step == STEPS and _same(params, reference)


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
  assert "(SIGTERM); checkpoint saved. Run the same command (--workdir" in text
  stopped, _ = _params(str(tmp_path / "w"))
  assert 10 <= stopped < STEPS, stopped  # a checkpoint at the step it stopped, off the schedule
  ok = _resumed_equals(reference, tmp_path / "w", hcp_dir, tmp_path / "log2.txt")
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
  ok = _resumed_equals(reference, tmp_path / "w", hcp_dir, tmp_path / "log2.txt")
  _record(f"SIGKILL after checkpoints {done}, then resume", ok,
          f"steps after {done[-1]} recomputed")
  assert ok


# ----------------------------------------------------------------------------------------------
# Fine-tuning: it runs on the pretraining loop (training/loop.py), with the same guarantees.

FT_STEPS = 40  # subprocess runs: ~1 s a step on CPU, long enough to be interrupted mid-run


@pytest.fixture(scope="module")
def pretrained_workdir(hcp_dir, tmp_path_factory):
  """A short pretraining run to fine-tune from (only its checkpoint is read)."""
  workdir = tmp_path_factory.mktemp("pretrained")
  train_and_evaluate(tiny_config(hcp_dir, steps=2), str(workdir))
  return workdir


def _ft_overrides(**extra):
  """configs/finetune.py:tiny (subject-id, head dropout 0.1) on one device, a short schedule, a
  cheap test side, no FC baseline."""
  c = {"mesh.num_devices": 1, "train.num_steps": FT_STEPS, "train.warmup_steps": 5,
       "train.log_every": 5, "train.eval_every": FT_STEPS, "train.checkpoint_every": 25,
       "data.max_eval_windows": 8, "data.eval_batch_size": 8, "baselines.fc": False,
       "baselines.random_init": False}
  c.update(extra)
  return c


def _start_finetune(workdir, pretrained, log, **extra):
  return _popen("finetune", [
      "--config", "configs/finetune.py:tiny", "--checkpoint", str(pretrained), "--workdir",
      str(workdir), *[f"--config.{k}={v}" for k, v in _ft_overrides(**extra).items()]], log)


def _metric_steps(path):
  if not os.path.isfile(path):
    return []
  return [json.loads(line)["step"] for line in open(path) if line.strip().endswith("}")]


@pytest.fixture(scope="module")
def finetune_reference(pretrained_workdir, tmp_path_factory):
  """An uninterrupted `brainlm-finetune` subprocess: the params every resumed run must reach."""
  workdir = tmp_path_factory.mktemp("ft_reference")
  proc = _start_finetune(workdir, pretrained_workdir, workdir / "log.txt")
  assert proc.wait(timeout=900) == 0, open(workdir / "log.txt").read()[-3000:]
  step, params = _params(str(workdir))
  assert step == FT_STEPS
  return params


@pytest.mark.slow
def test_finetune_sigterm_saves_exits_0_and_resumes_bit_exact(finetune_reference,
                                                              pretrained_workdir, tmp_path):
  """SIGTERM in the fine-tuning run, then in its random-init baseline run: each time the job
  saves, writes no report and exits 0; the same command resumes, bit for bit."""
  w, extra = tmp_path / "w", {"baselines.random_init": True}
  log = tmp_path / "log1.txt"
  proc = _start_finetune(w, pretrained_workdir, log, **extra)
  _wait_for(lambda: f"step 10/{FT_STEPS}" in open(log).read(), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=240) == 0, open(log).read()[-3000:]
  text = open(log).read()
  assert "(SIGTERM); checkpoint saved. Run the same command (--workdir" in text
  assert "run the same command to resume" in text  # brainlm-finetune's own last word
  assert not (w / "finetune.json").exists()
  stopped = _steps(str(w))[-1]
  assert 10 <= stopped < FT_STEPS, stopped  # saved at the step it stopped, off the schedule

  # The same command: resumes the fine-tuning run, finishes it, starts the random-init baseline;
  # SIGTERM in the baseline run.
  log = tmp_path / "log2.txt"
  proc = _start_finetune(w, pretrained_workdir, log, **extra)
  rand_metrics = w / "random_init" / "metrics.jsonl"
  _wait_for(lambda: any(s >= 10 for s in _metric_steps(rand_metrics)), proc, timeout=600)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=240) == 0, open(log).read()[-3000:]
  text = open(log).read()
  assert f"Resumed from {w / 'checkpoints'} at step {stopped}" in text
  assert "(SIGTERM); checkpoint saved" in text
  assert not (w / "finetune.json").exists()  # no report with a half-trained baseline
  step, params = _params(str(w))
  rand_stopped = _steps(str(w / "random_init"))[-1]
  assert 10 <= rand_stopped < FT_STEPS, rand_stopped
  ok = step == FT_STEPS and _same(params, finetune_reference)

  log = tmp_path / "log3.txt"
  proc = _start_finetune(w, pretrained_workdir, log, **extra)
  assert proc.wait(timeout=900) == 0, open(log).read()[-3000:]
  results = json.load(open(w / "finetune.json"))
  assert [(r["name"], r["source"]) for r in results["rows"]] == [
      ("fine-tuned", "pretrained"), ("fine-tuned", "random-init")]
  assert _steps(str(w / "random_init"))[-1] == FT_STEPS
  step, params = _params(str(w))  # the finished run was not trained further
  ok = ok and step == FT_STEPS and _same(params, finetune_reference)
  _record(f"brainlm-finetune: SIGTERM at step {stopped}, resume, SIGTERM in the random-init "
          f"baseline at step {rand_stopped}, resume", ok)
  assert ok


def _ft_config(steps):
  from configs import finetune as finetune_configs  # pylint: disable=import-outside-toplevel
  c = finetune_configs.get_config("tiny")
  for k, v in _ft_overrides(**{"train.num_steps": steps, "train.warmup_steps": 2,
                               "train.log_every": 2, "train.eval_every": steps,
                               "train.checkpoint_every": 1000,
                               "train.async_checkpoints": False}).items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def test_finetune_stop_and_resume_is_bit_exact(pretrained_workdir, tmp_path):
  """finetune(N steps) == finetune(stop_at_step=k) then finetune again: the whole state (params,
  optimizer, RNG: the head's dropout draws from it) and the test scores, to the bit."""
  from brainlm_jax.transfer.finetune import finetune  # pylint: disable=import-outside-toplevel
  config = _ft_config(steps=6)
  assert config.task.head_dropout > 0  # so the resumed RNG matters
  whole = finetune(config, str(pretrained_workdir), str(tmp_path / "whole"))
  assert whole["finished"] and whole["steps"] == 6
  stopped = finetune(config, str(pretrained_workdir), str(tmp_path / "split"), stop_at_step=3)
  assert stopped == {"finished": False, "steps": 3}
  assert _steps(str(tmp_path / "split")) == [3]  # saved where it stopped, off the schedule
  assert not (tmp_path / "split" / "finetune.json").exists()
  resumed = finetune(config, str(pretrained_workdir), str(tmp_path / "split"))
  assert resumed["finished"] and resumed["steps"] == 6
  (step_a, a), (step_b, b) = _state(str(tmp_path / "whole")), _state(str(tmp_path / "split"))
  ok = step_a == step_b == 6 and _same(a, b) and resumed["rows"] == whole["rows"]
  _record("fine-tuning stopped at step 3 (stop_at_step), then resumed", ok)
  assert ok


# ----------------------------------------------------------------------------------------------
# Checkpoint safety.

_KILL_MID_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
from brainlm_jax.training import checkpoint, state as state_lib
ckpt = checkpoint.Checkpointer(sys.argv[1], async_save=True)
def state(n, v):
  return state_lib.TrainState(step=jnp.asarray(n, jnp.int32), params={"w": jnp.full((n,), v)},
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
  train_and_evaluate(config, workdir)
  _, params_20 = _params(workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "20"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/20/state"):
    load_pretrained(workdir)  # probing names the broken directory

  train_and_evaluate(config, workdir)  # resumes from 15 and recomputes 16..20
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
  train_and_evaluate(config, workdir)
  other = tiny_config(hcp_dir, steps=2)
  other.model.decoder_hidden_size = 16
  with pytest.raises(ValueError, match="model.decoder_hidden_size: checkpoint 32 vs now 16"):
    train_and_evaluate(other, workdir)
  pre = load_pretrained(workdir)
  cfg = pre.model_cfg.__class__(**{**pre.model_cfg.__dict__, "num_layers": 3})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"encoder/layer_2/.*missing from the checkpoint"):
    load_pretrained(workdir, model_cfg=cfg)
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
  train_and_evaluate(config, workdir)
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
  with pytest.raises(NonFiniteError, match=r"^step 7: NaN/inf"):
    train_and_evaluate(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = ckpt.all_steps()
  ckpt.close()
  _, params = _params(workdir)
  ok = steps == [5] and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  _record("NaN batch at step 7 (on_nonfinite=stop)", ok, "steps 6-7 (stopped before saving)")
  assert ok


def test_train_step_never_applies_a_nonfinite_update():
  config = tiny_config("unused", steps=10)
  mcfg = state_lib.model_config(config, num_parcels=6, has_coords=False)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp",
                                                                          "tensor"))
  tx = state_lib.make_optimizer(config.train)
  state, _ = state_lib.create_train_state(mcfg, tx, mesh, seed=0)
  step = jax.jit(lambda s, b: steps_lib.train_step(
      s, b, None, model=build_model(mcfg), tx=tx, mask_cfg=config.masking, loss_kind="mse",
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
    train_and_evaluate(config, str(tmp_path))
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
  data = linked_recordings(hcp_dir, tmp_path / "data", 3)
  rng = np.random.default_rng(0)
  good = rng.standard_normal((300, 94)).astype(np.float32)
  np.save(data / "sub-ok_bold.npy", good)
  bad = {
      "sub-inf_bold.npy": "inf",
      "sub-short_bold.npy": "shorter than window",
      "sub-flatmany_bold.npy": "constant",
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
  flat[:, 7] = 3.0  # one dead parcel (out of the field of view): kept, marked missing
  np.save(data / "sub-flat_bold.npy", flat)
  flat[:, 10:30] = 0.0  # 21 of 94: more than max_dead_fraction, skipped
  np.save(data / "sub-flatmany_bold.npy", flat)
  np.save(data / "sub-3d_bold.npy", good.reshape(300, 2, 47))
  raw = (data / "sub-ok_bold.npy").read_bytes()
  (data / "sub-trunc_bold.npy").write_bytes(raw[:len(raw) // 3])
  pwned = tmp_path / "pwned"
  monkeypatch.setenv("BRAINLM_PWNED", str(pwned))
  np.save(data / "sub-pickle_bold.npy", np.array([_Exploit()], dtype=object), allow_pickle=True)
  (data / "sub-empty_bold.csv").write_text("")

  recs, skipped = datasets.load_recordings(str(data), window=200, num_parcels=94)
  reasons = {os.path.basename(s["path"]): s["reason"] for s in skipped}
  assert set(reasons) == set(bad), reasons
  for name, words in bad.items():
    assert reasons[name].startswith(str(data / name)), reasons[name]  # names the file
    assert words.lower() in reasons[name].lower(), (name, reasons[name])
  assert not pwned.exists()  # the pickle was refused, never executed
  assert len(recs) == 5
  assert [r.dead.tolist() for r in recs if r.path.endswith("sub-flat_bold.npy")] == [[7]]
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
