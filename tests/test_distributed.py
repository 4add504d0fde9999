"""Multi-process training: 2 processes x 4 CPU devices (jax.distributed on localhost) train
exactly like 1 process x 8 devices, write one set of metrics, and a checkpoint they wrote
together restores in a single process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from brainlm_jax.cli import common
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import pretrain as pretrain_lib
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from configs import pretrain
from tests.conftest import REPO

STEPS = 3
# Tiny model; every step logged; one evaluation and one checkpoint at the end.
OVERRIDES = {
    "model.hidden_size": 32, "model.mlp_dim": 64, "model.decoder_hidden_size": 32,
    "model.decoder_mlp_dim": 64, "model.num_heads": 2, "model.decoder_num_heads": 2,
    "model.num_layers": 1, "model.attention": "xla",
    "train.batch_size": 8, "train.eval_batch_size": 8, "train.num_steps": STEPS,
    "train.warmup_steps": 1, "train.learning_rate": 3e-3, "train.log_every": 1,
    "train.eval_every": STEPS, "train.checkpoint_every": STEPS, "data.max_eval_windows": 8,
}


def _config(hcp_dir):
  c = pretrain.get_config("tiny")
  c.data.path = str(hcp_dir)
  for key, value in OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _restore_params(workdir, like_state, shardings):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  state, meta = ckpt.restore(step, ckpt_lib.abstract_with_shardings(like_state, shardings))
  ckpt.close()
  return step, jax.device_get(state.params), meta


def test_distributed_args():
  assert common.distributed_args(environ={}) is None
  assert common.distributed_args(environ={"SLURM_NTASKS": "1"}) is None
  assert common.distributed_args(environ={"SLURM_NTASKS": "4"}) == {}  # JAX detects the rest
  assert common.distributed_args(mode="on", environ={}) == {}
  assert common.distributed_args(mode="off", environ={"SLURM_NTASKS": "4"}) is None
  assert common.distributed_args("h:1", 2, 1, environ={}) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert common.distributed_args("h:1", environ={"JAX_NUM_PROCESSES": "2",
                                                 "JAX_PROCESS_ID": "0"})["num_processes"] == 2
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    common.distributed_args("h:1", environ={})
  with pytest.raises(ValueError, match="not in"):
    common.distributed_args("h:1", 2, 2, environ={})


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(hcp_dir, tmp_path):
  assert jax.device_count() == 8 and jax.process_count() == 1
  # The reference: 1 process x 8 devices (this one), the same mesh (data=8).
  config = _config(hcp_dir)
  one_dir = str(tmp_path / "one")
  pretrain_lib.train_and_evaluate(config, one_dir)

  # 2 processes x 4 devices through the CLI flags of every entrypoint.
  two_dir = str(tmp_path / "two")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  args = ["--config", "configs/pretrain.py:tiny", "--workdir", two_dir,
          f"--config.data.path={hcp_dir}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
          f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "brainlm_jax.cli.pretrain", *args,
                             f"--process_id={i}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  try:
    logs = [p.communicate(timeout=900)[0] for p in procs]  # generous: shared CI machines
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
  assert "process 0/2, 4 local / 8 global devices" in logs[0]
  # Only process 0 logs the step lines and writes metrics (one row per step, not two).
  assert f"step {STEPS}/{STEPS}" in logs[0] and f"step {STEPS}/{STEPS}" not in logs[1]

  one, two = _metrics(one_dir), _metrics(two_dir)
  assert [r["step"] for r in two] == [r["step"] for r in one] == [0, *range(1, STEPS + 1)]
  for key in ("train_loss", "eval_loss"):
    a = [r[key] for r in one if key in r]
    b = [r[key] for r in two if key in r]
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=key)
  assert one[-1]["train_loss"] < one[1]["train_loss"]  # it trains

  # The checkpoint the 2 processes wrote together restores here (1 process, 8 devices).
  mesh = sharding.create_mesh(config.mesh)
  mcfg = state_lib.model_config(config, num_parcels=94, has_coords=False)
  fresh, shardings = state_lib.create_train_state(mcfg, state_lib.make_optimizer(config.train),
                                                  mesh, 0)
  step_one, params_one, _ = _restore_params(one_dir, fresh, shardings)
  step_two, params_two, meta = _restore_params(two_dir, fresh, shardings)
  assert step_one == step_two == STEPS and meta["data"]["next_step"] == STEPS
  # Same tolerance as tests/test_sharding.py: Adam turns reduction-order rounding into noise of
  # a fraction of one step's size.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4),
                         params_two, params_one)
