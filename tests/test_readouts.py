"""Token readings fitted on training rows only (transfer/readouts.py) and the probes that use
them: numerics against brute force, a planted leak, a planted signal hidden by the parcel
identity, cross-session identification."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from brainlm_jax.data.datasets import load_recordings
from brainlm_jax.data.scaling import RobustScaler
from brainlm_jax.models import connectivity
from brainlm_jax.training import state as state_lib
from brainlm_jax.transfer import clinical, features, identify, linear, readouts, run
from brainlm_jax.transfer.features import WindowFeatures, fc_features
from configs import pretrain


def _corr_z(x):
  r = np.corrcoef(x)
  iu = np.triu_indices(len(x), k=1)
  return np.arctanh(np.clip(r[iu], -1 + 1e-6, 1 - 1e-6))


def test_token_fc_removes_the_training_parcel_means_then_the_window_mean():
  """Against np.corrcoef per window: parcel means subtracted, then the window's mean token over
  its usable parcels; a dead parcel's and an unseen (NaN) token's pairs are NaN."""
  rng = np.random.default_rng(0)
  n, p, d = 7, 6, 16
  tokens = rng.standard_normal((n, p, d)).astype(np.float32)
  tokens[2, 4] = np.nan  # a masked readout's parcel no draw left visible
  live = np.ones((n, p), np.float32)
  live[:, 1] = 0  # dead in every window
  mean = rng.standard_normal((p, d)).astype(np.float32)
  got = readouts.token_fc(tokens, live=live, parcel_mean=mean)
  iu = np.triu_indices(p, k=1)
  for i in range(n):
    ok = np.isfinite(tokens[i]).all(-1) & (live[i] > 0)
    x = tokens[i].astype(np.float64) - mean
    x = x - x[ok].mean(axis=0)
    want = np.full(len(iu[0]), np.nan)
    pair_ok = ok[iu[0]] & ok[iu[1]]
    want[pair_ok] = _corr_z(x[ok])  # the usable parcels' pairs, in the same order
    np.testing.assert_array_equal(np.isnan(got[i]), ~pair_ok)
    np.testing.assert_allclose(got[i][pair_ok], want[pair_ok], rtol=1e-4, atol=1e-4)


def _tokens_with_identity(n, p=8, d=32, identity=5.0, seed=0):
  """Tokens = a window's signal part (`signal` [n, p, d]) + each parcel's identity vector (the
  same in every window, `identity` times larger)."""
  rng = np.random.default_rng(seed)
  signal = rng.standard_normal((n, p, d))
  ident = identity * rng.standard_normal((p, d))
  return (signal + ident).astype(np.float32), signal, ident


def test_fitted_readings_take_their_statistics_from_the_training_rows_only():
  """A planted leak: the held-out windows carry an offset (a new site) that a mean over all rows
  would absorb. The training rows' features do not move when the held-out rows change, and the
  held-out rows' features are those of the training-rows statistics (brute force)."""
  tokens, _, _ = _tokens_with_identity(40)
  train, test = np.arange(20), np.arange(20, 40)
  leaky = tokens.copy()
  leaky[test] += 10.0 * np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
  for kind in readouts.KINDS:
    a = readouts.fit_reading(kind, tokens, None, train)
    b = readouts.fit_reading(kind, leaky, None, train)
    np.testing.assert_array_equal(a(train), b(train))
    np.testing.assert_allclose(a.mean, tokens[train].mean(axis=0), rtol=1e-5, atol=1e-5)
    all_rows = readouts.fit_reading(kind, leaky, None, np.arange(40))
    assert np.abs(all_rows.mean - b.mean).max() > 1.0  # what the leak would have moved
    assert np.abs(all_rows(test) - b(test)).max() > 0.01
  want = readouts.token_fc(leaky[test], parcel_mean=tokens[train].mean(axis=0))
  np.testing.assert_allclose(readouts.fit_reading("fc", leaky, None, train)(test), want,
                             rtol=1e-5, atol=1e-5)


def test_parcel_pca_finds_each_parcels_planted_direction():
  """tokens-pca: each parcel's training tokens vary along its own planted direction; its first
  component is that direction (up to sign: fixed so the largest entry is positive)."""
  rng = np.random.default_rng(2)
  n, p, d = 300, 5, 12
  dirs = rng.standard_normal((p, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  tokens = (3 * rng.standard_normal((n, p, 1)) * dirs + 0.1 * rng.standard_normal((n, p, d))
            + 4 * rng.standard_normal((p, d))).astype(np.float32)
  fit = readouts.fit_reading("pca", tokens, None, np.arange(200), components=2)
  first = fit.components[:, :, 0]
  assert np.all(np.abs(np.sum(first * dirs, axis=1)) > 0.99)
  comps = fit.components.astype(np.float64)
  np.testing.assert_allclose(np.einsum("pdk,pdl->pkl", comps, comps), np.tile(np.eye(2), (p, 1, 1)),
                             atol=1e-5)
  x = fit(np.arange(200, 300)).reshape(100, p, 2)
  proj = np.einsum("npd,pd->np", tokens[200:] - tokens[:200].mean(0), dirs)
  assert np.all(np.abs([np.corrcoef(x[:, j, 0], proj[:, j])[0, 1] for j in range(p)]) > 0.99)


def test_tokens_fc_reads_a_signal_that_the_parcel_identity_hides():
  """The review's finding 1: per-window token correlations are dominated by the parcel identity
  vectors every subject shares (a learned parcel table), which hides a planted group difference
  in how two parcels' tokens co-vary. Removing the training fold's parcel means (tokens-fc) finds
  it; the old reading (only the window's mean token removed) does not."""
  rng = np.random.default_rng(3)
  n_sub, per, p, d = 60, 3, 8, 32
  n = n_sub * per
  y = np.repeat(np.tile(["a", "b"], n_sub // 2), per)
  tokens, signal, ident = _tokens_with_identity(n, p, d, identity=8.0, seed=4)
  tokens[y == "a", 1] = (ident[1] + 0.8 * signal[y == "a", 0] + 0.6 * signal[y == "a", 1])
  feats = WindowFeatures(features={}, recording=np.arange(n), subject=np.repeat(
      [f"s{i}" for i in range(n_sub)], per), window=np.tile(np.arange(per), n_sub),
      paths=[f"r{i}" for i in range(n)], tokens={"tokens": tokens}, live=np.ones((n, p)),
      fitted={"tokens-fc": ("fc", "tokens")})
  sites = np.repeat(np.arange(n_sub) % 4, per)

  class Rec:
    def __init__(self, i):
      self.subject, self.site, self.path = f"s{i // per}", f"site{sites[i]}", f"r{i}"
      self.signal = rng.standard_normal((40, p))
  recs = [Rec(i) for i in range(n)]
  values = {f"s{i}": y[i * per] for i in range(n_sub)}
  res = clinical.cohort_probe(feats, recs, "group", values, cv="kfold", folds=4, tangent=False)
  acc = {e["name"]: e["metrics"]["accuracy"]["mean"] for e in res["feature_sets"]}
  assert acc["tokens-fc"] >= 0.9, acc
  old = readouts.token_fc(tokens)  # the window mean only: identity kept
  means = np.stack([old[y == c].mean(0) for c in "ab"])
  spread = old.std(axis=0).mean()
  new = readouts.fit_reading("fc", tokens, None, np.arange(n))(np.arange(n))
  assert np.abs(means[0] - means[1]).max() / spread < 0.5 * (
      np.abs(new[y == "a"].mean(0) - new[y == "b"].mean(0)).max() / new.std(axis=0).mean())


def test_session_probe_identifies_subjects_across_sessions():
  """Cross-session identification on planted subject-specific connectivity: fc identifies every
  subject from one session's windows against the other session's scans, both directions; a
  reading without subject information sits near chance; the statistics of the fitted reading
  come from the gallery session."""
  rng = np.random.default_rng(5)
  n_sub, p, w = 10, 12, 60
  mix = [np.eye(p) + 0.6 * rng.standard_normal((p, p)) for _ in range(n_sub)]

  class Rec:
    def __init__(self, s, day):
      self.subject, self.site, self.path = f"sub{s}", "A", f"sub{s}_day{day}.npy"
      self.signal = rng.standard_normal((4 * w, p)) @ mix[s].T
  recs = [Rec(s, day) for s in range(n_sub) for day in (1, 2)]
  rec_idx = np.repeat(np.arange(len(recs)), 4)
  windows = np.stack([recs[i].signal[j * w:(j + 1) * w].T for i, j in
                      zip(rec_idx, np.tile(np.arange(4), len(recs)))])
  fc = fc_features(windows)
  n = len(rec_idx)
  tokens = rng.standard_normal((n, p, 8)).astype(np.float32)  # no subject information
  feats = WindowFeatures(
      features={"mean": rng.standard_normal((n, 4)).astype(np.float32), "fc": fc},
      recording=rec_idx, subject=np.asarray([recs[i].subject for i in rec_idx]),
      window=np.tile(np.arange(4), len(recs)), paths=[r.path for r in recs],
      tokens={"tokens": tokens}, live=np.ones((n, p)), fitted={"tokens-fc": ("fc", "tokens")},
      order=["mean", "tokens-fc", "fc"])
  sessions = {r.path: r.path[-5] for r in recs}
  res = identify.session_probe(feats, recs, sessions, seed=0)
  rows = {e["name"]: e["metrics"] for e in res["feature_sets"]}
  assert res["directions"] == ["1->2", "2->1"] and res["n_queries"] == n
  assert rows["fc"]["match_accuracy"]["mean"] == 1.0
  assert rows["fc"]["linear_accuracy"]["mean"] >= 0.9
  assert rows["mean"]["match_accuracy"]["mean"] < 0.4
  assert rows["tokens-fc"]["match_accuracy"]["mean"] < 0.4
  assert len(rows["fc"]["match_accuracy"]["per_subject"]) == n_sub
  assert res["chance"]["match_accuracy"] == pytest.approx(0.1)
  choice = next(e for e in res["feature_sets"] if e["name"] == "model")
  assert set(choice["chosen"].values()) <= {"mean", "tokens-fc"}
  test = res["paired_test"]
  assert test["method"] == "match" and test["b"] == "fc" and test["p_value"] < 0.01
  # over subjects (10: the smallest two-sided exact p is 0.002), not over the 80 queries
  assert "each subject's" in test["test"] and test["subjects_a_better"] == 0
  assert test["subjects_b_better"] == n_sub
  with pytest.raises(ValueError, match="at least 2 sessions"):
    identify.session_probe(feats, recs, {r.path: "1" for r in recs})


def test_patch_correlation_matches_numpy_and_reads_fc_through_a_random_encoder(hcp_dir):
  """models.connectivity.patch_correlation against NumPy (a dead parcel left out of the patch
  means), and on real HCP windows the random-init encoder's patches-fc follows the window's FC
  (FC read through the network), far more than the time-averaged tokens-fc does."""
  rng = np.random.default_rng(6)
  b, p, t, d = 2, 5, 3, 4
  tokens = rng.standard_normal((b, p, t, d)).astype(np.float32)
  live = np.ones((b, p), np.float32)
  live[1, 2] = 0
  got = np.asarray(connectivity.patch_correlation(jnp.asarray(tokens), jnp.asarray(live)))
  for i in range(b):
    ok = live[i] > 0
    x = tokens[i].astype(np.float64) - tokens[i].mean(axis=1, keepdims=True)
    x = (x - x[ok].mean(axis=0)).reshape(p, -1)
    np.testing.assert_allclose(got[i][np.ix_(ok, ok)], np.corrcoef(x[ok]), atol=1e-5)
  np.testing.assert_array_equal(got[1, 2], 0.0)

  c = pretrain.get_config("tiny")
  recs, _ = load_recordings(str(hcp_dir), window=200)
  cfg = state_lib.model_config(c, 94, False)
  pre = run.Pretrained(model_cfg=cfg, params=state_lib.init_params(cfg, 0),
                       scaler=RobustScaler().fit(recs[:2]), coords=None,
                       config=json.loads(c.to_json_best_effort()), step=0, subjects={})
  f = features.extract_features(pre, recs[:2], readings=("patches-fc", "tokens-fc"),
                                random_seeds=(), batch_size=16)
  rows = np.arange(len(f.window))

  def follows(name):
    x = f.reading(name, rows, rows)
    return np.mean([np.corrcoef(x[i], f.features["fc"][i])[0, 1] for i in rows])
  assert follows("patches-fc") > 0.6 and follows("patches-fc") > follows("tokens-fc") + 0.2


def test_masked_readout_draws_the_runs_masking_per_window():
  """The masked-* readings (the review's finding 5): the encoder sees what it saw in pretraining,
  the run's masking mode and ratio; a window's draw d depends on (seed, d, window id) only, not
  on the batch it sits in, and draws differ."""
  from brainlm_jax.transfer import functions  # pylint: disable=import-outside-toplevel
  grid = (20, 3)
  a = functions.readout_ids(0, 0, np.arange(8), grid, mode="uniform", ratio=0.5)
  b = functions.readout_ids(0, 0, np.arange(4, 12), grid, mode="uniform", ratio=0.5)
  assert a.shape == (8, 30) and np.all(np.diff(a, axis=1) > 0)
  np.testing.assert_array_equal(a[4:], b[:4])
  assert not np.array_equal(a, functions.readout_ids(0, 1, np.arange(8), grid, mode="uniform",
                                                     ratio=0.5))
  per_parcel = functions.readout_ids(0, 0, np.arange(2), grid, mode="parcel", ratio=0.5)
  assert np.all(np.bincount(per_parcel[0] // 3, minlength=20) == 1)


def test_paired_tests_over_windows_count_subjects_not_windows():
  """Two subjects x 50 windows, a right on every window, b on none: McNemar over windows would
  say p ~ 1e-30; the test over subjects (2 of them) cannot go below 0.5."""
  y = np.repeat(np.asarray(["s1", "s2"], object), 50)
  wrong = np.where(y == "s1", "s2", "s1").astype(object)
  grouped = clinical.paired_runs_test("classification", y, [y.copy()], [wrong], groups=y)
  assert grouped["p_value"] == pytest.approx(0.5)
  assert grouped["subjects_a_better"] == 2 and "each subject's" in grouped["test"]
  assert clinical.paired_runs_test("classification", y, [y.copy()], [wrong])["p_value"] < 1e-20
  tests = clinical.paired_tests("classification", y, {"model": y.copy(), "fc": wrong,
                                                      "random-model": wrong}, groups=y)
  assert [t["b"] for t in tests] == ["fc", "random-model"]
  assert all(t["p_value"] == pytest.approx(0.5) for t in tests)


def test_inner_folds_keep_each_recordings_windows_together():
  """With groups (the gallery windows' scans), no inner fold has a scan on both sides and every
  class is in every inner training fold; without, the folds are stratified over windows."""
  y = np.repeat(np.arange(6), 8)  # 6 subjects x 2 scans x 4 windows
  scans = np.repeat(np.arange(12), 4)
  model = linear.classifier(y, 0, groups=scans)
  splits = model[-1].cv
  assert len(splits) == 2
  for tr, te in splits:
    assert not set(scans[tr]) & set(scans[te])
    assert set(y[tr]) == set(range(6))
  x = np.random.default_rng(0).standard_normal((len(y), 5)) + y[:, None]
  pred, _ = linear.fit_predict("classification", x, y, x, list(range(6)), 0, groups=scans)
  assert np.mean(pred == y) > 0.8
  assert not isinstance(linear.classifier(y, 0)[-1].cv, list)


def test_paired_runs_test_ties_equal_shares_exactly():
  """Ten subjects with pretrained 2/3 right and random 3/3, ten with 1/3 and 0/3: the
  differences (-1/3, +1/3) tie in magnitude, so the signed-rank test is symmetric (p = 1). In
  float, 2/3 - 1 and 1/3 - 0 differ in the last bit; unrounded, they ranked apart (p 0.055)."""
  y = np.ones(20, int)
  right, wrong = np.ones(20, int), np.zeros(20, int)
  first = np.arange(20) < 10
  a = [np.where(first, right, right), np.where(first, right, wrong), np.where(first, wrong, wrong)]
  b = [np.where(first, right, wrong)] * 3
  res = clinical.paired_runs_test("classification", y, a, b)
  assert res["subjects_a_better"] == 10 and res["subjects_b_better"] == 10
  assert res["p_value"] == pytest.approx(1.0)
