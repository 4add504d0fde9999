"""Fine-tuning under cross-validation on a cohort folder: the nested validation never reads the
test fold (a planted leak), per-subject aggregation, each strategy's frozen parameters stay
bit-identical, a preempted fold resumes to the same model, the report's rows and tests, and
clear errors."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest

from brainlm_jax.data.scaling import RobustScaler
from brainlm_jax.data.datasets import load_recordings
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.transfer import clinical
from brainlm_jax.transfer import finetune as ft
from brainlm_jax.transfer import finetune_cv
from brainlm_jax.transfer.run import load_pretrained, random_init
from brainlm_jax.transfer.tasks import TaskData
from configs import finetune as finetune_configs
from configs import pretrain
from tests.conftest import REPO, shrink_model

SITES, PER_SITE, PARCELS, TIME, WINDOW = ("S1", "S2", "S3", "S4", "S5", "S6"), 4, 8, 120, 40


def _write_cohort(root, leak_sites=()):
  """rois/<site>_<id>_rois.npy and Phenotypic.csv (FILE_ID, SITE_ID, DX_GROUP, AGE_AT_SCAN);
  DX 2 has a planted 4-parcel rhythm. leak_sites: their labels swapped in the table and their
  recordings replaced by noise (what a leak of the test fold would see)."""
  rng = np.random.default_rng(0)
  (root / "rois").mkdir(parents=True, exist_ok=True)
  rows, k = [], 0
  t = np.arange(TIME)[:, None]
  for site in SITES:
    for i in range(PER_SITE):
      k += 1
      fid = f"{site}_{50000 + k}"
      dx = 1 + i % 2
      x = rng.standard_normal((TIME, PARCELS))
      if dx == 2:
        x[:, :4] += 1.5 * np.sin(2 * np.pi * t / 10 + rng.uniform(0, 6))
      if site in leak_sites:
        x = 5 * np.random.default_rng(k).standard_normal((TIME, PARCELS))
      np.save(root / "rois" / f"{fid}_rois.npy", (100 + x).astype(np.float32))
      label = 3 - dx if site in leak_sites else dx
      rows.append(f"{50000 + k},{fid},{site},{label},{20 + k}")
  (root / "Phenotypic.csv").write_text("SUB_ID,FILE_ID,SITE_ID,DX_GROUP,AGE_AT_SCAN\n"
                                       + "\n".join(rows) + "\n")
  return root


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """A cohort folder and a (never trained) tiny pretraining checkpoint of it."""
  root = tmp_path_factory.mktemp("cv")
  data = _write_cohort(root / "data")
  c = pretrain.get_config("tiny")
  c.data.path, c.data.window, c.model.patch_len = str(data), WINDOW, 10
  c.model.attention = "xla"
  shrink_model(c, 16, num_layers=2)
  recs, _ = load_recordings(str(data), window=WINDOW)
  scaler = RobustScaler().fit(recs)
  mcfg = state_lib.model_config(c, PARCELS, False)
  mesh = sharding.create_mesh(dict(c.mesh, num_devices=1))
  state, _ = state_lib.create_train_state(mcfg, state_lib.make_optimizer(c.train), mesh, seed=3)
  meta = {"config": json.loads(c.to_json_best_effort()), "model": dataclasses.asdict(mcfg),
          "data": {"seed": 0, "next_step": 5}, "scaler": scaler.to_dict(), "coords": None,
          "subjects": {"train": [r.subject for r in recs], "validation": []}}
  ck = ckpt_lib.Checkpointer(str(root / "pre" / "checkpoints"), async_save=False)
  ck.save(5, state, meta)
  ck.close()
  return root, load_pretrained(str(root / "pre"))


def _config(data, **over):
  c = finetune_configs.get_config("tiny")
  c.data.path, c.data.cv, c.data.site_folds = str(data), "site", 2
  c.task.target, c.task.head_hidden, c.task.head_dropout = "DX_GROUP", 8, 0.0
  c.mesh.num_devices = 1
  c.train.batch_size = c.data.eval_batch_size = 8
  c.train.num_steps = c.train.lp_steps = 12
  c.train.warmup_steps, c.train.eval_every, c.train.log_every = 2, 4, 4
  c.train.learning_rate, c.train.lp_learning_rate = 3e-3, "3e-3"
  c.train.async_checkpoints = False
  c.baselines.random_seeds, c.baselines.tangent = 0, False
  c.task.strategies = "full"
  for key, value in over.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def _fold_result(workdir, strategy, init, fold):
  found = list((workdir / "runs" / strategy / init / "seed0" / fold).glob("*/result.json"))
  assert len(found) == 1, found
  return json.loads(found[0].read_text())


@pytest.fixture(scope="module")
def full_run(cohort, tmp_path_factory):
  root, pre = cohort
  out = tmp_path_factory.mktemp("full")
  results = finetune_cv.FinetuneCV(_config(root / "data")).run(pre, str(out))
  return out, results


def test_nested_validation_never_reads_the_test_fold(cohort, full_run, tmp_path):
  root, pre = cohort
  out, results = full_run
  assert results["finished"] and len(results["folds"]) == 2
  for fold in results["folds"]:
    test_sites = set(fold["name"].split("+"))
    assert len(test_sites) == 3 and not test_sites & set(fold["validation"])
    assert len(fold["validation"]) == 1  # whole sites of the training fold validate
  # Planted leak: the first fold's test sites get flipped labels and noise recordings. Every
  # choice of that fold (the validation curve, the step) must not move, nor the model.
  first = results["folds"][0]["name"]
  leaky = _write_cohort(tmp_path / "leaky", leak_sites=first.split("+"))
  out2 = tmp_path / "out2"
  again = finetune_cv.FinetuneCV(_config(leaky)).run(pre, str(out2))
  a = _fold_result(out, "full", "pretrained-1", first)
  b = _fold_result(out2, "full", "pretrained-1", first)
  assert a["curve"] == b["curve"] and a["chosen_step"] == b["chosen_step"]
  params = [flax.serialization.msgpack_restore(open(r["dir"] + "/params.msgpack", "rb").read())
            for r in (a, b)]
  assert all(np.array_equal(x, y) for x, y in zip(*map(jax.tree_util.tree_leaves, params)))
  # ...while what it predicts for that fold does change (its recordings were replaced).
  assert a["values"] != b["values"] and again["finished"]


def test_subject_aggregation_averages_window_probabilities():
  recs = [type("R", (), {"subject": s})() for s in ("b", "a")]
  task = TaskData("dx", "classification", [], recs, classes=["1", "2"], unit="subject",
                  test_labels=np.asarray([1, 0]))
  logits = np.log(np.asarray([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]]))
  units, y, values = ft.subject_outputs(task, logits, np.asarray([0, 0, 1, 1]))
  assert units == ["a", "b"] and y.tolist() == [0, 1]
  np.testing.assert_allclose(values, [[0.6, 0.4], [0.4, 0.6]])
  reg = TaskData("age", "regression", [], recs, unit="subject", y_mean=10.0, y_std=2.0,
                 test_labels=np.asarray([30.0, 20.0]))
  units, y, values = ft.subject_outputs(reg, np.asarray([[1.0], [3.0], [0.0], [-1.0]]),
                                        np.asarray([0, 0, 1, 1]))
  np.testing.assert_allclose(values[:, 0], [9.0, 14.0])


def _leaves(tree, *path):
  for p in path:
    tree = tree[p]
  return jax.tree_util.tree_leaves(tree)


def test_strategies_freeze_what_they_say(cohort, tmp_path):
  root, pre = cohort
  c = _config(root / "data", task__strategies="linear,lp-ft,top,bottom,aux-mae",
              baselines__random_seeds=1, train__lp_learning_rate="3e-3,3e-2")
  c.data.site_folds = 2
  results = finetune_cv.FinetuneCV(c).run(pre, str(tmp_path))
  init = jax.device_get(pre.params)
  fold = results["folds"][0]["name"]

  def params(strategy, init_label="pretrained-1"):
    """The fold model's params of each of the run's variants (linear: one per learning rate)."""
    d = tmp_path / "runs" / strategy / init_label / "seed0" / fold
    return [flax.serialization.msgpack_restore((v / "params.msgpack").read_bytes())["brainlm"]
            for v in sorted(d.iterdir())]

  def same(p, *path):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(p, *path), _leaves(init, *path)))

  linear = params("linear")
  assert len(linear) == 2  # mean_lr0.003, mean_lr0.03: validation picks one per fold
  for lin in linear:
    assert all(same(lin, k) for k in lin)  # the whole encoder, bit for bit
  (top,), (bottom,), (aux,) = params("top"), params("bottom"), params("aux-mae")
  assert sorted(k for k in top["encoder"] if k.startswith("layer_")) == ["layer_0", "layer_1"]
  assert same(top, "patch_embed") and same(top, "encoder", "layer_0")
  assert not same(top, "encoder", "layer_1")
  assert same(bottom, "encoder", "layer_1") and not same(bottom, "encoder", "layer_0")
  assert not same(bottom, "patch_embed")
  assert any("decoder" in k for k in aux) and not same(aux, "encoder", "layer_0")
  # The random-init rows start from the network at random init (seed 0), not the checkpoint.
  rand = params("linear", "random-0")[0]
  ref = jax.device_get(random_init(pre, 0).params)
  assert all(np.array_equal(x, y) for x, y in zip(_leaves(rand, "encoder"),
                                                   _leaves(ref, "encoder")))
  # The report: a row per (strategy, init), baselines, paired tests over the same subjects.
  names = [r["name"] for r in results["rows"]]
  for s in ("linear", "lp-ft", "top", "bottom", "aux-mae"):
    assert s in names and f"random-{s}" in names
  assert "fc" in names and "site" in names
  assert len(results["paired_tests"]) == 5 + 1  # each strategy vs random, the best vs fc
  assert "| lp-ft |" in (tmp_path / "finetune_cv.md").read_text()


def test_a_preempted_fold_resumes_to_the_same_model(cohort, full_run, tmp_path):
  root, pre = cohort
  out, results = full_run
  job = finetune_cv.FinetuneCV(_config(root / "data"), stop_at_step=6)
  assert job.run(pre, str(tmp_path)) == {"finished": False, "runs_done": 0}
  resumed = finetune_cv.FinetuneCV(_config(root / "data")).run(pre, str(tmp_path))
  for fold in results["folds"]:
    a = _fold_result(out, "full", "pretrained-1", fold["name"])
    b = _fold_result(tmp_path, "full", "pretrained-1", fold["name"])
    assert a["curve"] == b["curve"] and a["values"] == b["values"]
  assert resumed["rows"][0]["metrics"] == results["rows"][0]["metrics"]


def test_inner_split_and_grouped_site_folds():
  sites = np.asarray(sum([[s] * n for s, n in zip("ABCDEF", (10, 8, 6, 4, 2, 2))], []))
  y = np.arange(len(sites)) % 2
  groups = clinical.site_groups(sites, 3)
  assert groups == {"A": 0, "B": 1, "C": 2, "D": 2, "E": 1, "F": 0}
  folds = clinical.cohort_folds(y, np.arange(len(y)), sites, "site", 3, 0, "classification",
                                site_folds=3)
  assert [f[2] for f in folds] == ["A+F", "B+E", "C+D"]
  tr = folds[0][0]
  fit, val = clinical.inner_split(tr, sites, y, "site", 0.2, 0, "classification")
  assert set(sites[val]).isdisjoint(sites[fit]) and set(sites[val]) < set(sites[tr])
  assert not set(val) & set(folds[0][1])
  fit, val = clinical.inner_split(tr, sites, y, "kfold", 0.25, 0, "classification")
  assert sorted(np.concatenate([fit, val]).tolist()) == sorted(tr.tolist())


def test_bad_options_are_clear_errors(cohort):
  root, _ = cohort
  with pytest.raises(ValueError, match="unknown strategy 'ful'"):
    finetune_cv.FinetuneCV(_config(root / "data", task__strategies="ful"))
  with pytest.raises(ValueError, match="data.subset='DX_GROUP'; expected COLUMN=VALUE"):
    finetune_cv.FinetuneCV(_config(root / "data", data__subset="DX_GROUP"))
  with pytest.raises(ValueError, match="subject-level target"):
    finetune_cv.FinetuneCV(_config(root / "data", task__target="subject-id"))
  with pytest.raises(ValueError, match="train.trainable='middle'"):
    ft.validate_config(_config(root / "data", train__trainable="middle"), 1)
  c = copy.deepcopy(_config(root / "data", task__pooling="mean,max"))
  with pytest.raises(ValueError, match="task.pooling='mean,max'"):
    ft.validate_config(c, 1)


def _finetune_cli(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "brainlm_jax.cli.finetune", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=600)


def test_cli_cv_site_with_two_pretraining_runs(cohort, tmp_path):
  root, _ = cohort
  out = tmp_path / "cli"
  r = _finetune_cli(
      "--config=configs/finetune.py:tiny", "--cv=site",
      f"--checkpoint={root / 'pre'},{root / 'pre'}", f"--workdir={out}",
      f"--config.data.path={root / 'data'}", "--config.data.site_folds=2",
      "--config.task.target=AGE_AT_SCAN", "--config.task.head_hidden=0",
      "--config.mesh.num_devices=1", "--config.train.batch_size=8",
      "--config.data.eval_batch_size=8", "--config.train.num_steps=8",
      "--config.train.eval_every=4", "--config.train.warmup_steps=2",
      "--config.baselines.random_seeds=1", "--config.baselines.tangent=false")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((out / "finetune_cv.json").read_text())
  assert report["task"] == "regression" and "AGE_AT_SCAN" in r.stdout
  assert [r["name"] for r in report["rows"]][:3] == ["full", "full@2", "random-full"]
  assert all(0 < r["permutation_p"] <= 1 for r in report["rows"] if "permutation_p" in r)
  r = _finetune_cli("--config=configs/finetune.py:tiny", f"--workdir={out}2",
                    f"--checkpoint={root / 'pre'},{root / 'pre'}")
  assert r.returncode == 1 and "compared under --cv site|kfold" in r.stderr
