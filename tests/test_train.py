"""Pretraining end to end on the real HCP recordings: learns, checkpoints, resumes to the bit."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from brainlm_jax import checkpoint as ckpt_lib
from brainlm_jax import train
from configs import pretrain


def _config(hcp_dir, steps=40):
  c = pretrain.get_config("tiny")
  c.data.path = str(hcp_dir)
  c.data.max_eval_windows = 24
  c.model.hidden_size = 32
  c.model.mlp_dim = 64
  c.model.decoder_hidden_size = 32
  c.model.decoder_mlp_dim = 64
  c.model.num_heads = 2
  c.model.decoder_num_heads = 2
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_steps = steps
  c.train.warmup_steps = 5
  c.train.learning_rate = 3e-3
  c.train.log_every = 10
  c.train.eval_every = steps
  c.train.checkpoint_every = 1000
  c.train.async_checkpoints = False
  c.mesh.num_devices = 1  # one device: bit-exact comparisons
  return c


def _params(workdir):
  ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  restored = ckpt.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return step, restored["state"]["params"]


def test_loss_falls_on_real_data_and_resume_is_bit_exact(hcp_dir, tmp_path):
  config = _config(hcp_dir)
  last = train.train_and_evaluate(config, str(tmp_path / "a"))
  rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  evals = [r for r in rows if "eval_loss" in r]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
  assert evals[-1]["eval_loss"] < 0.6 * evals[0]["eval_loss"], evals
  assert last["eval_r2"] > evals[0]["eval_r2"]
  assert all(k in r for r in rows if "train_loss" in r for k in ("step", "train_loss"))
  report = json.load(open(tmp_path / "a" / "data_report.json"))
  train_subj = {r["subject"] for r in report["train"]}
  assert train_subj.isdisjoint({r["subject"] for r in report["validation"]})
  assert (tmp_path / "a" / "normalization.json").exists()
  assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))

  # Interrupted at step 17 (checkpointed), then resumed from the workdir: same bits at step 40.
  train.train_and_evaluate(config, str(tmp_path / "b"), stop_at_step=17)
  assert _params(tmp_path / "b")[0] == 17
  train.train_and_evaluate(config, str(tmp_path / "b"))
  step_a, params_a = _params(tmp_path / "a")
  step_b, params_b = _params(tmp_path / "b")
  assert step_a == step_b == 40
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)


def test_resume_with_a_different_model_is_refused(hcp_dir, tmp_path):
  config = _config(hcp_dir, steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  config.model.hidden_size = 64
  with pytest.raises(ValueError, match="model.hidden_size"):
    train.train_and_evaluate(config, str(tmp_path))
