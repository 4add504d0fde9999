"""Pretraining end to end on the real HCP recordings: learns, checkpoints, resumes to the bit."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import pretrain
from tests.conftest import tiny_config


def _config(hcp_dir, steps=40):
  return tiny_config(hcp_dir, steps)


def _params(workdir):
  ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  restored = ckpt.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return step, restored["state"]["params"]


def test_loss_falls_on_real_data_and_resume_is_bit_exact(hcp_dir, tmp_path):
  config = _config(hcp_dir)
  last = pretrain.train_and_evaluate(config, str(tmp_path / "a"))
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
  pretrain.train_and_evaluate(config, str(tmp_path / "b"), stop_at_step=17)
  assert _params(tmp_path / "b")[0] == 17
  pretrain.train_and_evaluate(config, str(tmp_path / "b"))
  step_a, params_a = _params(tmp_path / "a")
  step_b, params_b = _params(tmp_path / "b")
  assert step_a == step_b == 40
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)


def test_resume_with_a_different_model_is_refused(hcp_dir, tmp_path):
  config = _config(hcp_dir, steps=2)
  pretrain.train_and_evaluate(config, str(tmp_path))
  config.model.hidden_size = 64
  with pytest.raises(ValueError, match="model.hidden_size"):
    pretrain.train_and_evaluate(config, str(tmp_path))


def test_pretrain_reads_a_prepared_tfds_dataset(hcp_dir, tmp_path):
  """data.path may name a `brainlm-prepare build` dataset: its splits and stored scaler are used."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from data_pipelines.brainlm_fmri import Builder  # pylint: disable=import-outside-toplevel
  config = {c.name: c for c in Builder.BUILDER_CONFIGS}["hcp_aal94"]
  builder = Builder(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(hcp_dir)))
  meta = builder.info.metadata
  c = _config(tmp_path / "tfds", steps=3)
  pretrain.train_and_evaluate(c, str(tmp_path / "w"))
  report = json.load(open(tmp_path / "w" / "data_report.json"))
  assert sorted({r["subject"] for r in report["train"]}) == sorted(meta["subjects"]["train"])
  assert sorted({r["subject"] for r in report["validation"]}) == sorted(
      meta["subjects"]["validation"])
  saved = json.load(open(tmp_path / "w" / "normalization.json"))
  np.testing.assert_allclose(saved["median"], meta["scaler"]["median"])
  np.testing.assert_allclose(saved["iqr"], meta["scaler"]["iqr"])
  # Every tool that reads recordings (probe, evaluate, ...) reads the prepared dataset too.
  from brainlm_jax.data import datasets  # pylint: disable=import-outside-toplevel
  recs, _ = datasets.load_recordings(str(tmp_path / "tfds"), window=200)
  assert sorted(r.subject for r in recs) == sorted(s for v in meta["subjects"].values() for s in v)


def test_other_atlas_length_and_no_validation_split(hcp_dir, tmp_path):
  """Real ROI time series of another scanner and atlas (nitime: 31 named ROIs in a CSV with a
  header, 250 timepoints, TR 1.35 s, one subject): another parcel count and window, and
  val_fraction=0 trains without evaluation instead of failing."""
  csv = hcp_dir.parent / "nitime_sample" / "fmri_timeseries.csv"
  c = _config(csv, steps=3)
  c.data.window = 240
  with pytest.raises(ValueError, match="val_fraction=0"):
    pretrain.train_and_evaluate(c, str(tmp_path / "a"))
  c.data.val_fraction = 0.0
  last = pretrain.train_and_evaluate(c, str(tmp_path / "b"))
  assert np.isfinite(last["train_loss"]) and "eval_loss" not in last
  step, params = _params(tmp_path / "b")
  assert step == 3
  shapes = [x.shape for x in jax.tree_util.tree_leaves(params)]
  assert (31, 32) in shapes  # the learned per-parcel spatial table (no coordinates given)
