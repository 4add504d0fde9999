"""Linear probing: params-only restore, window embeddings, probes that find a planted signal,
subject fingerprinting on the real HCP recordings (model vs random-init vs FC), clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import type_handlers
import pytest

from tests.conftest import REPO, SHARED_DATA, run_cli_report, shrink_model

from brainlm_jax.data.datasets import load_recordings
from brainlm_jax.data.run_data import prepare_data
from brainlm_jax.data import windows
from brainlm_jax.data.readers import Recording
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import state as state_lib
from brainlm_jax.transfer import features
from brainlm_jax.transfer import functions
from brainlm_jax.transfer import labels
from brainlm_jax.transfer import probe
from brainlm_jax.transfer import run as run_lib
from configs import pretrain

STEP = 3
BATCH = 16  # one batch size everywhere: the encoder compiles once per test session


def _config(hcp_dir):
  c = pretrain.get_config("tiny")
  c.data.path = str(hcp_dir)
  shrink_model(c, 32, num_layers=1)
  c.mesh.num_devices = 1
  return c


def _saved_run(config, wd, seed=1):
  """`wd` holding one checkpoint of `config`'s network initialised from `seed`, saved the way
  train_and_evaluate saves it (params, AdamW state with non-zero moments, meta) without the cost
  of compiling a train step. Returns (params, scaler)."""
  data = prepare_data(config)
  mcfg = state_lib.model_config(config, data.train[0].signal.shape[1], False)
  params = state_lib.init_params(mcfg, seed=seed)
  tx = state_lib.make_optimizer(config.train)
  opt_state = jax.tree_util.tree_map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating)
                                     else x, tx.init(params))
  state = state_lib.TrainState(step=jnp.asarray(STEP, jnp.int32), params=params,
                               opt_state=opt_state, rng=jax.random.PRNGKey(0))
  meta = {"config": json.loads(config.to_json_best_effort()), "model": dataclasses.asdict(mcfg),
          "data": {"seed": 0, "next_step": STEP}, "scaler": data.scaler.to_dict(), "coords": None,
          "subjects": {"train": sorted({r.subject for r in data.train}),
                       "validation": sorted({r.subject for r in data.val})}}
  ck = ckpt_lib.Checkpointer(str(wd / "checkpoints"), async_save=False)
  ck.save(STEP, state, meta)
  ck.close()
  return params, data.scaler


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pretraining workdir with one checkpoint (init seed 1: not the probe's random seed 0)."""
  from tests.conftest import HCP_DIR  # pylint: disable=import-outside-toplevel
  if not HCP_DIR.is_dir():
    pytest.skip(f"real data not found at {HCP_DIR}")
  wd = tmp_path_factory.mktemp("pretrain")
  return (wd, *_saved_run(_config(HCP_DIR), wd))


@pytest.fixture(scope="module")
def pre(workdir):
  return run_lib.load_pretrained(str(workdir[0]))


def test_restore_reads_params_only(workdir, monkeypatch):
  wd, params, scaler = workdir
  read = []
  original = type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    read.extend(i.name for i in infos if not i.skip_deserialize)
    return await original(self, infos, args)

  monkeypatch.setattr(type_handlers.ArrayHandler, "deserialize", spy)
  for path in (wd, wd / "checkpoints" / str(STEP)):
    read.clear()
    p = run_lib.load_pretrained(str(path))
    assert read and all(n.startswith("params.") for n in read), read  # no opt_state/step/rng
    assert len(read) == len(jax.tree_util.tree_leaves(params))
  assert p.step == STEP and p.model_cfg.num_parcels == 94 and p.model_cfg.num_layers == 1
  assert p.coords is None and p.config["data"]["window"] == 200
  assert len(p.subjects["train"]) + len(p.subjects["validation"]) == 7
  np.testing.assert_array_equal(p.scaler.iqr, scaler.iqr)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p.params, params)
  assert set(p.params) >= {"encoder", "patch_embed", "cls"} and not hasattr(p, "opt_state")


def test_restore_errors_name_the_path(workdir, pre, tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="no such checkpoint directory") as e:
    run_lib.load_pretrained(str(tmp_path / "nope"))
  assert str(tmp_path / "nope") in str(e.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoints found"):
    run_lib.load_pretrained(str(tmp_path / "empty"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"available steps: \[3\]"):
    run_lib.load_pretrained(str(workdir[0]), step=7)
  wrong = dataclasses.replace(pre.model_cfg, hidden_size=64, num_layers=2)
  with pytest.raises(ckpt_lib.CheckpointError, match="do not match the ModelConfig") as e:
    run_lib.load_pretrained(str(workdir[0]), model_cfg=wrong)
  msg = str(e.value)
  assert str(workdir[0]) in msg
  assert "cls: checkpoint shape (1, 1, 32) vs model shape (1, 1, 64)" in msg
  assert "encoder/layer_1/mlp_in/kernel: missing from the checkpoint" in msg


def test_embeddings(pre, hcp_dir):
  recs, _ = load_recordings(str(hcp_dir), window=200)
  fn = functions.encode_fn(pre.model_cfg)
  e = functions.embed(pre, recs[:2], batch_size=BATCH)
  compiled = fn.jitted._cache_size()  # pylint: disable=protected-access
  assert e["cls"].shape == e["mean"].shape == (12, 32)  # 1200 timepoints: 6 windows each
  np.testing.assert_array_equal(e["window"], np.tile(np.arange(6), 2))
  np.testing.assert_array_equal(e["recording"], np.repeat([0, 1], 6))
  assert list(e["subject"]) == [recs[0].subject] * 6 + [recs[1].subject] * 6
  assert np.isfinite(e["cls"]).all() and np.isfinite(e["mean"]).all()
  assert np.abs(e["cls"] - e["mean"]).max() > 1e-3
  # A window's embedding does not depend on its batch neighbours; the jit is reused, also for
  # the random-init params.
  alone = functions.embed(pre, recs[1:2], batch_size=BATCH)
  np.testing.assert_allclose(alone["cls"], e["cls"][6:], atol=1e-5)
  rand = functions.embed(run_lib.random_init(pre, 0), recs[1:2], batch_size=BATCH)
  assert np.abs(rand["cls"] - alone["cls"]).max() > 1e-3
  assert fn.jitted._cache_size() == compiled  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="pretrained on windows of 200"):
    run_lib.check_inputs(pre, recs[:1], window=100)  # what embed checks first


def test_every_layer_and_per_parcel_pooling(pre, hcp_dir):
  """The clinical probe's readings: layer i's CLS/mean for i < L, per-parcel pooling of the last
  layer (its parcel average is the mean token), the last layer equal to encode_fn's."""
  recs, _ = load_recordings(str(hcp_dir), window=200)
  cfg = dataclasses.replace(pre.model_cfg, num_layers=2)
  deep = dataclasses.replace(pre, model_cfg=cfg, params=state_lib.init_params(cfg, seed=3))
  f = features.extract_features(deep, recs[:1], batch_size=BATCH, random_seeds=(), fc=False,
                                readings=("cls", "mean", "parcels", "layers"))
  assert list(f.features) == ["cls", "mean", "parcels", "layer1-cls", "layer1-mean"]
  x = f.features
  assert x["parcels"].shape == (6, 94 * 32) and x["layer1-mean"].shape == (6, 32)
  np.testing.assert_allclose(x["parcels"].reshape(6, 94, 32).mean(axis=1), x["mean"], atol=1e-5)
  e = functions.embed(deep, recs[:1], batch_size=BATCH)
  np.testing.assert_allclose(x["cls"], e["cls"], atol=1e-5)
  np.testing.assert_allclose(x["mean"], e["mean"], atol=1e-5)
  assert np.abs(x["layer1-mean"] - x["mean"]).max() > 1e-2 and np.isfinite(x["layer1-cls"]).all()


def test_tokens_fc_correlates_parcel_tokens_and_leaves_dead_parcels_missing(pre, hcp_dir):
  """tokens-fc: each pair of parcels' last-layer tokens (the `parcels` reading), each parcel's
  mean token over the training windows and then the window's mean token removed, correlated
  across features (Fisher z); a dead parcel's pairs are NaN; random-tokens-fc reads the
  random-init encoder the same way; the masked readout's tokens are the visible ones'."""
  recs, _ = load_recordings(str(hcp_dir), window=200)
  signal = recs[0].signal.copy()
  signal[:, 5] = 3.0  # a dead parcel
  rec = dataclasses.replace(recs[0], signal=signal)
  f = features.extract_features(pre, [rec], batch_size=BATCH, random_seeds=(0,), fc=False,
                                readings=("parcels", "tokens-fc", "masked-tokens-fc"))
  assert f.names == ["tokens-fc", "masked-tokens-fc", "parcels", "random-tokens-fc",
                     "random-masked-tokens-fc"]
  n = len(f.window)
  tokens = f.features["parcels"].reshape(n, 94, -1).astype(np.float64)
  np.testing.assert_allclose(f.tokens["tokens"], tokens, atol=1e-6)
  live = np.arange(94) != 5
  train, test = np.arange(3), np.arange(3, n)
  tokens = tokens - tokens[train].mean(axis=0)
  tokens = tokens - tokens[:, live].mean(axis=1, keepdims=True)
  iu = np.triu_indices(94, k=1)
  want = np.stack([np.arctanh(np.clip(np.corrcoef(t)[iu], -1 + 1e-6, 1 - 1e-6)) for t in tokens])
  got = f.reading("tokens-fc", train, np.arange(n))
  dead = (iu[0] == 5) | (iu[1] == 5)
  assert got.shape == (n, 94 * 93 // 2) and np.isnan(got[:, dead]).all()
  np.testing.assert_allclose(np.tanh(got[:, ~dead]), np.tanh(want[:, ~dead]), atol=1e-4)
  assert f.dim("tokens-fc") == 94 * 93 // 2
  rand = f.reading("random-tokens-fc", train, test)
  assert np.isnan(rand[:, dead]).all() and np.abs(rand[:, ~dead] - got[test][:, ~dead]).max() > 0.1
  masked = f.tokens["masked-tokens"]  # uniform 0.5 over 10 patches: some visible in 2 draws
  assert np.isfinite(masked).all() and np.abs(masked - f.tokens["tokens"]).max() > 1e-2
  assert features.source_of("tokens-fc") == "model"
  assert features.source_of("random-tokens-fc@3") == "random-init"
  assert features.source_of("masked-mean@2") == "model" and features.run_of("cls@3") == 2


def _synthetic(pre, tmp_path, n_subjects=24, seed=0):
  """Recordings whose parcels 0-29 share a source with a subject-dependent weight u in [0, 1]
  (raising their amplitude and correlation); phenotypes.tsv holds age = 20 + 50 u, group."""
  rng = np.random.default_rng(seed)
  u = rng.uniform(0, 1, n_subjects)
  recs = []
  for s in range(n_subjects):
    x = rng.standard_normal((400, 94))
    x[:, :30] += 3 * u[s] * rng.standard_normal((400, 1))
    x = 9000 + x * pre.scaler.iqr  # raw-BOLD-like scale
    recs.append(Recording(path=str(tmp_path / "siteA" / f"sub-{s:02d}_bold.npy"),
                          subject=f"sub-{s:02d}", signal=x.astype(np.float32)))
  lines = ["participant_id\tage\tgroup\tscanner"]
  lines += [f"sub-{s:02d}\t{20 + 50 * u[s]:.2f}\t{'high' if u[s] > np.median(u) else 'low'}\tX"
            for s in range(n_subjects)]
  (tmp_path / "phenotypes.tsv").write_text("\n".join(lines) + "\n")
  return recs, tmp_path / "phenotypes.tsv"


def test_probe_recovers_a_planted_signal(pre, tmp_path):
  recs, pheno = _synthetic(pre, tmp_path)
  feats = features.extract_features(pre, recs, batch_size=BATCH)
  assert set(feats.features) == set(features.FEATURE_SETS)
  assert feats.features["fc"].shape == (48, 94 * 93 // 2)
  assert feats.features["random-mean"].shape == (48, 32)

  reg = probe.run_probe(feats, "age", phenotypes=str(pheno), folds=4)
  assert reg["task"] == "regression" and reg["n_subjects"] == 24 and reg["n_folds"] == 4
  by = {fs["name"]: fs["metrics"] for fs in reg["feature_sets"]}
  assert [fs["source"] for fs in reg["feature_sets"]] == ["model", "model", "random-init",
                                                          "random-init", "fc"]
  assert by["fc"]["r2"]["mean"] > 0.5, by["fc"]
  assert by["fc"]["pearson_r"]["mean"] > 0.8
  assert max(by["cls"]["r2"]["mean"], by["mean"]["r2"]["mean"]) > 0.5, by["mean"]  # amplitude
  lo, hi = by["fc"]["r2"]["ci95"]
  assert lo <= by["fc"]["r2"]["mean"] <= hi and len(by["fc"]["r2"]["folds"]) == 4

  cls = probe.run_probe(feats, "group", phenotypes=str(pheno), folds=4)
  assert cls["task"] == "classification" and cls["classes"] == ["high", "low"]
  by = {fs["name"]: fs["metrics"] for fs in cls["feature_sets"]}
  assert by["fc"]["balanced_accuracy"]["mean"] >= 0.8, by["fc"]
  assert by["fc"]["roc_auc"]["mean"] >= 0.85
  assert cls["chance"]["balanced_accuracy"] == 0.5

  paths = probe.write_report(reg, str(tmp_path / "out"))
  assert json.load(open(paths["json"]))["feature_sets"][4]["name"] == "fc"
  assert "**" in open(paths["md"]).read()


def test_subject_id_on_hcp_end_to_end(workdir, tmp_path, capsys):
  """The CLI (in-process): --data defaults to the checkpoint's data.path."""
  out = tmp_path / "out"
  argv = ["brainlm-probe", f"--checkpoint={workdir[0]}", "--target=subject-id", f"--out={out}",
          f"--batch-size={BATCH}"]
  printed, res = run_cli_report("probe", argv, capsys)
  assert "| fc | fc | 4371 |" in printed and "| random-cls | random-init | 32 |" in printed
  assert res["target"] == "subject-id" and res["n_subjects"] == 7 and res["n_windows"] == 42
  assert res["checkpoint"]["step"] == STEP
  assert res["pretraining_overlap"] == {"probe_subjects": 7, "train": 5, "validation": 2}
  by = {fs["name"]: fs for fs in res["feature_sets"]}
  # The default readings, of the pretrained encoder and of 3 random-init seeds, and each one's
  # inner-CV choice; fc.
  assert set(features.FEATURE_SETS) | {"tokens-fc", "masked-mean", "model", "random-model",
                                       "random-model@3", "random-tokens-fc@3"} <= set(by)
  assert res["options"]["random_seeds"] == [0, 1, 2]
  assert {fs["source"] for fs in res["feature_sets"]} == {"model", "random-init", "fc"}
  tests = res["paired_tests"]
  assert (tests[0]["a"], tests[0]["b"]) == ("model", "fc")
  # over the 7 subjects, not their windows (a subject's windows are not independent)
  assert tests[0]["test"].startswith("Wilcoxon signed-rank on each subject's")
  assert tests[1]["b"] == "random-model + random-model@2 + random-model@3"
  assert 0 <= tests[1]["p_value"] <= 1 and "Wilcoxon" in tests[1]["test"]
  assert by["fc"]["metrics"]["accuracy"]["mean"] >= 0.9  # FC fingerprints HCP subjects
  assert abs(res["chance"]["accuracy"] - 1 / 7) < 1e-9
  for fs in res["feature_sets"]:
    assert 0 <= fs["metrics"]["accuracy"]["mean"] <= 1
    assert len(fs["metrics"]["accuracy"]["per_subject"]) == 7
  md = (out / "probe.md").read_text()
  assert "| cls | model |" in md and "| fc | fc |" in md and "*chance*" in md
  assert (out / "probe.png").stat().st_size > 10_000


def _feats(n_subjects, windows=2, seed=0):
  rng = np.random.default_rng(seed)
  n = n_subjects * windows
  subjects = np.repeat([f"sub-{i}" for i in range(n_subjects)], windows)
  return features.WindowFeatures(
      features={"fc": rng.standard_normal((n, 6)).astype(np.float32)},
      recording=np.repeat(np.arange(n_subjects), windows), subject=subjects,
      window=np.tile(np.arange(windows), n_subjects),
      paths=[f"/data/hcp/{s}.mat" for s in dict.fromkeys(subjects)])


def test_bad_targets_are_clear_errors(tmp_path):
  feats = _feats(8)
  pheno = tmp_path / "p.csv"
  pheno.write_text("participant_id,age,sex,site\n" + "".join(
      f"sub-{i},{30 + i},{'MF'[i % 2]},A\n" for i in range(8)))
  with pytest.raises(ValueError, match="no target column .*'iq'.*available columns: "
                     "participant_id, age, sex, site"):
    probe.run_probe(feats, "iq", phenotypes=str(pheno))
  with pytest.raises(ValueError, match="no subject column .*'subject'"):
    probe.run_probe(feats, "age", phenotypes=str(pheno), subject_column="subject")
  with pytest.raises(ValueError, match="'site' is constant: all 8 subject"):
    probe.run_probe(feats, "site", phenotypes=str(pheno))
  with pytest.raises(ValueError, match="'site' is constant.*parent folder"):
    probe.run_probe(feats, "site")  # no phenotype file: every recording is in /data/hcp
  with pytest.raises(ValueError, match=r"only 8 subject.*folds=10.*8 subjects < 10 folds"):
    probe.run_probe(feats, "age", phenotypes=str(pheno), folds=10)
  with pytest.raises(ValueError, match="needs a phenotype file"):
    probe.run_probe(feats, "age")
  with pytest.raises(ValueError, match="non-numeric"):
    probe.run_probe(feats, "sex", phenotypes=str(pheno), task="regression")
  with pytest.raises(FileNotFoundError, match="phenotype file not found"):
    probe.run_probe(feats, "age", phenotypes=str(tmp_path / "missing.csv"))
  assert labels.infer_task(["1", "2", "1", "2"]) == "classification"
  # Small cohort ages.
  assert labels.infer_task(["25", "31", "28", "35", "22", "30"]) == "regression"
  # Windows repeat their subject's value: 6 ages over 12 windows are still 6 values.
  assert labels.infer_task(["25", "25", "31", "31", "28", "28", "35", "35", "22", "22", "30", "30"],
                           ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f"]
                           ) == "regression"
  assert labels.infer_task([str(v) for v in range(20)]) == "regression"
  assert labels.infer_task(["21.5", "30.25"]) == "regression"
  assert labels.infer_task(["M", "F"]) == "classification"


def test_cli_missing_checkpoint_is_one_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "brainlm_jax.cli.probe",
                      f"--checkpoint={tmp_path / 'no_run'}", "--target=subject-id",
                      f"--out={tmp_path / 'o'}"], cwd=REPO, capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 1
  assert f"brainlm-probe: error: {tmp_path / 'no_run'}: no such checkpoint directory" in r.stderr


def test_fingerprinting_single_window_recordings(pre, hcp_dir):
  """Recordings of 1.5 windows fit one window; fingerprinting then reads two overlapping ones
  (first and last timepoints) and still identifies the subjects by FC."""
  recs, _ = load_recordings(str(hcp_dir), window=200)
  short = [dataclasses.replace(r, signal=r.signal[:300]) for r in recs]
  plain = features.extract_features(pre, short, batch_size=BATCH, readings=(), random_seeds=())
  assert len(plain.window) == 7
  with pytest.raises(ValueError, match=r"recordings of >= 2 windows\) needs at least 2 subjects"):
    probe.run_probe(plain, "subject-id")
  feats = features.extract_features(pre, short, batch_size=BATCH, readings=(), random_seeds=(),
                                    min_windows=2)
  np.testing.assert_array_equal(feats.window, np.tile([0, 1], 7))
  first = next(windows.iter_windows(short[:1], None, window=200, min_windows=2))
  np.testing.assert_array_equal(first.signal[1], short[0].signal[100:300].T)  # the last 200
  res = probe.run_probe(feats, "subject-id")
  assert res["n_recordings_left_out"] == 0 and res["n_subjects"] == 7
  assert res["feature_sets"][0]["metrics"]["accuracy"]["mean"] >= 0.9


def test_cross_session_identification_on_hcp100_end_to_end(tmp_path, capsys):
  """--cv session on 6 subjects of hcp100_dk68 (days from scans.csv's `session` column, subjects
  from its `subject` column), two pretraining runs in one table and two random-init seeds: every
  row identifies each window of one day among the other day's scans, both directions; FC does
  it well; rows of the second run and seed, their choices and the paired tests are there."""
  source = SHARED_DATA / "hcp100_dk68"
  if not source.is_dir():
    pytest.skip(f"real data not found at {source}")
  folder = tmp_path / "hcp100"
  folder.mkdir()
  lines = (source / "scans.csv").read_text().splitlines()
  keep = sorted({line.split(",")[1] for line in lines[1:]})[:6]
  rows = [lines[0]] + [line for line in lines[1:] if line.split(",")[1] in keep]
  (folder / "scans.csv").write_text("\n".join(rows) + "\n")
  for line in rows[1:]:
    os.symlink(source / f"{line.split(',')[0]}.npy", folder / f"{line.split(',')[0]}.npy")
  runs = []
  for seed in (1, 2):
    c = pretrain.get_config("hcp")
    c.data.path = str(folder)
    shrink_model(c, 32, num_layers=1)
    c.mesh.num_devices = 1
    runs.append(tmp_path / f"run{seed}")
    _saved_run(c, runs[-1], seed=seed)
  out = tmp_path / "out"
  argv = ["brainlm-probe", f"--checkpoint={runs[0]},{runs[1]}", "--target=subject-id",
          "--cv=session", f"--data={folder}", f"--out={out}", f"--batch-size={BATCH}",
          "--readings=cls,mean,tokens-fc", "--random-seeds=2"]
  printed, res = run_cli_report("probe", argv, capsys)
  assert res["n_subjects"] == 6 and res["sessions"] == ["1", "2"]
  assert res["directions"] == ["1->2", "2->1"] and res["n_queries"] == 6 * 4 * 6
  by = {e["name"]: e["metrics"] for e in res["feature_sets"]}
  assert {"cls", "tokens-fc", "cls@2", "tokens-fc@2", "random-tokens-fc@2", "model", "model@2",
          "random-model", "random-model@2", "fc"} <= set(by)
  assert by["fc"]["match_accuracy"]["mean"] >= 0.8 and by["fc"]["linear_accuracy"]["mean"] >= 0.8
  assert abs(res["chance"]["match_accuracy"] - 1 / 6) < 1e-9
  tests = {(t["method"], t["b"]): t for t in res["paired_tests"]}
  assert tests["match", "fc"]["a"] == "model + model@2"
  assert "Wilcoxon" in tests["match", "random-model + random-model@2"]["test"]
  assert ("match", "random-model@2") in tests  # run 2 against its own init's seed
  md = (out / "probe.md").read_text()
  assert "over pretraining runs and random-init seeds" in md and "Paired tests on the same subjects" in md
  assert res["other_checkpoints"][0]["path"].startswith(str(runs[1]))
