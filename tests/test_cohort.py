"""Cohort folders (phenotype + TR tables beside the recordings), dead parcels, TR resampling,
leave-site-out folds, tangent-space FC fitted on training folds only, the clinical probe."""

import numpy as np
import pytest

from brainlm_jax.data import cohort, datasets, phenotypes
from brainlm_jax.transfer import clinical, connectivity
from brainlm_jax.transfer.features import WindowFeatures
from tests.conftest import SHARED_DATA

SITES = {"ALPHA": 1.0, "BETA_1": 2.0, "GAMMA": 2.5}


def _cohort_dir(tmp_path, n_per_site=4, dead=None, length=120):
  """ALPHA_00501_rois.npy ... with Phenotypic.csv (FILE_ID, SITE_ID, DX_GROUP, AGE, ADOS with
  -9999) and site_tr.csv; returns (folder, {file_id: dx})."""
  rng = np.random.default_rng(0)
  (tmp_path / "rois").mkdir()
  rows, dx = [], {}
  k = 0
  for site in SITES:
    for i in range(n_per_site):
      k += 1
      fid = f"{site}_{500 + k:07d}"
      x = rng.standard_normal((length, 6)).astype(np.float32)
      if dead is not None and k == 1:
        x[:, dead] = 3.0
      np.save(tmp_path / "rois" / f"{fid}_rois.npy", x)
      dx[fid] = 1 + i % 2
      ados = "-9999" if i % 2 else str(10 + i)
      rows.append(f"{k},{fid},{site.split('_')[0] if site == 'BETA_1' else site},{dx[fid]},"
                  f"{20 + k},{ados}")
  # The site column spells BETA_1's site as in the TR table (ABIDE's SITE_ID: UM_1).
  rows = [r.replace(",BETA,", ",BETA_1,") for r in rows]
  (tmp_path / "Phenotypic.csv").write_text(
      "SUB_ID,FILE_ID,SITE_ID,DX_GROUP,AGE_AT_SCAN,ADOS_TOTAL\n" + "\n".join(rows) + "\n")
  (tmp_path / "site_tr.csv").write_text(
      "SITE_ID,TR\n" + "\n".join(f"{s},{tr}" for s, tr in SITES.items()) + "\n")
  return tmp_path, dx


def test_missing_value_codes():
  assert phenotypes.is_missing("-9999") and phenotypes.is_missing("-9999.0")
  assert phenotypes.is_missing("") and not phenotypes.is_missing("0")


def test_cohort_folder_detected_and_overridable(tmp_path):
  root, _ = _cohort_dir(tmp_path)
  paths = sorted(str(p) for p in (root / "rois").iterdir())
  c = cohort.detect(str(root), paths)
  assert c.phenotypes.endswith("Phenotypic.csv") and c.id_column == "FILE_ID"
  assert c.site_column == "SITE_ID" and c.tr_table.endswith("site_tr.csv")
  assert c.match(paths[0]) == "ALPHA_0000501"
  assert c.site(paths[0]) == "ALPHA" and c.tr(paths[0]) == 1.0
  beta = [p for p in paths if "BETA_1" in p][0]
  assert c.site(beta) == "BETA_1" and c.tr(beta) == 2.0
  assert "ADOS_TOTAL" not in c.row(paths[1])  # -9999: missing, not a number
  assert c.row(paths[0])["ADOS_TOTAL"] == "10"
  assert any("12 of 12 recordings" in line for line in c.describe(paths))
  assert c.subject_column == "SUB_ID" and c.subject(paths[0]) == "1"
  assert any("subject ids from the column 'SUB_ID'" in line for line in c.describe(paths))
  assert c.subject(str(root / "rois" / "OTHER_0000999_rois.npy")) is None
  # explicit overrides
  c2 = cohort.detect(str(root), paths, phenotypes=str(root / "Phenotypic.csv"),
                     id_column="FILE_ID", site_column="SITE_ID",
                     tr_table=str(root / "site_tr.csv"))
  assert c2.tr(paths[0]) == 1.0
  with pytest.raises(ValueError, match="Phenotypic.csv: no site column 'SCANNER'.*FILE_ID"):
    cohort.detect(str(root), paths, site_column="SCANNER")
  c3 = cohort.detect(str(root), paths, subject_column="FILE_ID")
  assert c3.subject(paths[0]) == "ALPHA_0000501"
  with pytest.raises(ValueError, match="Phenotypic.csv: no subject column 'PARTICIPANT'.*SUB_ID"):
    cohort.detect(str(root), paths, subject_column="PARTICIPANT")
  with pytest.raises(ValueError, match="Phenotypic.csv: not a TR table"):
    cohort.detect(str(root), paths, tr_table=str(root / "Phenotypic.csv"))
  assert cohort.detect(str(root / "rois"), paths) is None  # no table there


def test_load_recordings_resamples_by_tr_table_and_keeps_dead_parcels(tmp_path):
  root, _ = _cohort_dir(tmp_path, dead=2)
  recs, skipped = datasets.load_recordings(str(root), window=10, target_tr=2.0,
                                           max_dead_fraction=0.2)  # 1 of 6 parcels
  assert not skipped and len(recs) == 12  # the two tables are not read as recordings
  by_site = {r.site: r for r in recs}
  assert by_site["ALPHA"].num_timepoints == 60  # 120 x 1.0 s -> 2.0 s
  assert by_site["BETA_1"].num_timepoints == 120
  assert by_site["GAMMA"].num_timepoints == 150  # 120 x 2.5 s
  assert all(r.tr == 2.0 for r in recs)
  first = [r for r in recs if r.path.endswith("ALPHA_0000501_rois.npy")][0]
  assert first.dead.tolist() == [2]  # kept, marked, still exactly constant after resampling
  assert {r.subject for r in recs} == {str(k) for k in range(1, 13)}  # the SUB_ID column
  # more dead parcels than allowed: skipped with the reason
  recs, skipped = datasets.load_recordings(str(root), window=10, max_dead_fraction=0.0)
  assert len(recs) == 11 and "constant" in skipped[0]["reason"]


def test_scan_table_subject_column_keeps_a_subjects_runs_together():
  """hcp100_dk68: scans.csv has one row per scan (`scan` names the file) and a `subject`
  column: 280 recordings of 70 subjects (4 runs each), never on both sides of the split; its
  region_names.txt is not read as a recording."""
  hcp100 = SHARED_DATA / "hcp100_dk68"
  if not hcp100.is_dir():
    pytest.skip(f"real data not found at {hcp100}")
  recs, skipped = datasets.load_recordings(str(hcp100), window=200)
  assert len(recs) == 280 and not skipped
  subjects = {r.subject for r in recs}
  assert len(subjects) == 70 and "100408" in subjects
  assert all(r.tr == pytest.approx(0.72) for r in recs)
  train, val = datasets.split_by_subject(recs, val_fraction=0.2)
  assert train and val and not {r.subject for r in train} & {r.subject for r in val}
  assert len(train) + len(val) == 280 and len(val) % 4 == 0


def test_no_subject_column_keeps_the_table_id(tmp_path):
  root, _ = _cohort_dir(tmp_path)
  table = root / "Phenotypic.csv"
  table.write_text("\n".join(line.split(",", 1)[1] for line in
                             table.read_text().splitlines()) + "\n")  # SUB_ID dropped
  recs, _ = datasets.load_recordings(str(root), window=10)
  assert sorted(r.subject for r in recs)[0] == "ALPHA_0000501"


def test_id_column_is_the_one_that_tells_files_apart(tmp_path):
  """Site names start the file names too (ABIDE: OHSU_0050142_...); with the site column first
  and every file matched by both, the id column is still FILE_ID."""
  root, _ = _cohort_dir(tmp_path)
  table = root / "Phenotypic.csv"
  lines = [line.split(",") for line in table.read_text().splitlines()]
  table.write_text("\n".join(",".join([r[2], r[1]] + r[3:]) for r in lines) + "\n")
  paths = sorted(str(p) for p in (root / "rois").iterdir())
  c = cohort.detect(str(root), paths)
  assert c.id_column == "FILE_ID" and c.site_column == "SITE_ID"
  assert c.match(paths[0]) == "ALPHA_0000501"


def test_unknown_tr_is_skipped_when_resampling(tmp_path):
  root, _ = _cohort_dir(tmp_path)
  (root / "site_tr.csv").write_text("SITE_ID,TR\nALPHA,1.0\n")
  recs, skipped = datasets.load_recordings(str(root), window=10, target_tr=2.0)
  assert len(recs) == 4 and len(skipped) == 8
  assert all("TR unknown" in s["reason"] for s in skipped)


def test_leave_site_out_folds_never_share_a_site_and_kfold_never_a_subject():
  rng = np.random.default_rng(0)
  sites = np.repeat(np.array(["a", "b", "c", "d"]), 10)
  y = rng.integers(2, size=40).astype(str)
  groups = np.arange(40).astype(str)
  splits = clinical.cohort_folds(y, groups, sites, "site", 5, 0, "classification")
  assert [name for *_, name in splits] == ["a", "b", "c", "d"]
  for tr, te, _ in splits:
    assert not set(sites[tr]) & set(sites[te])
  splits = clinical.cohort_folds(y, groups, sites, "kfold", 5, 0, "classification")
  assert sorted(np.concatenate([te for _, te, _ in splits]).tolist()) == list(range(40))
  for tr, te, _ in splits:
    assert not set(groups[tr]) & set(groups[te])


def _covs(n=14, p=6, seed=0):
  rng = np.random.default_rng(seed)
  return connectivity.covariances([rng.standard_normal((50, p)) @ rng.standard_normal((p, p))
                                   for _ in range(n)], standardize=False)


@pytest.mark.parametrize("memory", [2, 0])  # Anderson-mixed steps, nilearn's plain descent
def test_tangent_space_equals_nilearn(memory):
  from nilearn.connectome.connectivity_matrices import _geometric_mean, sym_matrix_to_vec
  covs = _covs()
  ts = connectivity.TangentSpace(tol=1e-12, max_iter=200, memory=memory).fit(covs[:10])
  ref = _geometric_mean(list(covs[:10]), max_iter=200, tol=1e-12)
  np.testing.assert_allclose(ts.mean_, ref, rtol=1e-7, atol=1e-9)
  vals, vecs = np.linalg.eigh(ref)
  white = (vecs / np.sqrt(vals)) @ vecs.T
  logs = []
  for c in covs:
    v, u = np.linalg.eigh(white @ c @ white)
    logs.append((u * np.log(v)) @ u.T)
  np.testing.assert_allclose(ts.transform(covs), sym_matrix_to_vec(np.array(logs)),
                             rtol=1e-6, atol=1e-8)


def test_anderson_takes_fewer_steps_to_the_same_mean():
  """Matrices far apart (the plain descent's slow case): Anderson mixing reaches nilearn's
  tolerance in fewer passes, at the same mean."""
  rng = np.random.default_rng(1)
  covs = []
  for _ in range(12):
    q = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    covs.append((q * np.exp(2.0 * rng.standard_normal(8))) @ q.T)
  covs = np.stack(covs)
  plain = connectivity.TangentSpace(memory=0).fit(covs)
  fast = connectivity.TangentSpace(memory=2).fit(covs)
  assert fast.n_iter_ <= plain.n_iter_ - 3, (fast.n_iter_, plain.n_iter_)
  ref = connectivity.TangentSpace(tol=1e-13, max_iter=300, memory=0).fit(covs)
  scale = np.abs(ref.mean_).max()
  for ts in (plain, fast):
    assert ts.converged_ and np.abs(ts.mean_ - ref.mean_).max() / scale < 1e-5
  with pytest.warns(UserWarning, match="without reaching the tolerance"):
    assert not connectivity.TangentSpace(max_iter=3).fit(covs).converged_


def test_tangent_free_steps_equal_computing_them():
  """fit_transform's vectors are transform's; a start with its logarithms given (the previous
  fold's) takes the same steps as one that computes them, and lands on the same mean."""
  covs = _covs(n=20)
  a = connectivity.TangentSpace(tol=1e-12, max_iter=200)
  np.testing.assert_allclose(a.fit_transform(covs[:12]), a.transform(covs[:12]), atol=1e-12)
  fold2 = np.arange(6, 20)
  logs_there = a.log_map(covs[fold2])
  b = connectivity.TangentSpace(tol=1e-12, max_iter=200).fit(covs[fold2], init=a.mean_)
  c = connectivity.TangentSpace(tol=1e-12, max_iter=200).fit(covs[fold2], init=a.mean_,
                                                             init_logs=logs_there)
  assert b.n_iter_ == c.n_iter_ > 1
  np.testing.assert_allclose(c.mean_, b.mean_, rtol=1e-12, atol=1e-14)
  fresh = connectivity.TangentSpace(tol=1e-12, max_iter=200).fit(covs[fold2])
  np.testing.assert_allclose(c.mean_, fresh.mean_, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(c.transform(covs), fresh.transform(covs), rtol=1e-7, atol=1e-8)


def test_tangent_fit_uses_training_subjects_only():
  covs = _covs()
  tr = np.arange(10)
  a = connectivity.TangentSpace().fit(covs[tr])
  planted = covs.copy()
  planted[10:] *= 50.0  # extreme test subjects: would move a mean fitted on them
  b = connectivity.TangentSpace().fit(planted[tr])
  np.testing.assert_array_equal(a.transform(covs[tr]), b.transform(planted[tr]))
  c = connectivity.TangentSpace().fit(planted)  # what a leak would look like
  assert np.abs(c.transform(covs[tr]) - a.transform(covs[tr])).max() > 0.1
  # Starting the descent at the leaky mean (as FoldTangents starts folds from all subjects) still
  # converges to the training subjects' own mean.
  d = connectivity.TangentSpace(tol=1e-12, max_iter=200).fit(covs[tr], init=c.mean_)
  e = connectivity.TangentSpace(tol=1e-12, max_iter=200).fit(covs[tr])
  np.testing.assert_allclose(d.mean_, e.mean_, rtol=1e-8, atol=1e-10)


def test_fold_tangents_fit_each_fold_on_its_training_subjects():
  """Folds side by side on threads, all started at the mean of every subject (planted far
  away): each lands on its own training subjects' mean, as a fresh fit does."""
  import concurrent.futures
  covs = _covs(n=20)
  covs[15:] *= 50.0  # the test subjects of the first fold: they move the shared start
  folds = connectivity.FoldTangents(lambda: covs, tol=1e-12, max_iter=200)
  splits = [(np.arange(15), np.arange(15, 20)), (np.arange(5, 20), np.arange(5))]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outs = list(pool.map(lambda s: folds(*s), splits))
  for (tr, te), (x_tr, x_te) in zip(splits, outs):
    ref = connectivity.TangentSpace(tol=1e-12, max_iter=200, memory=0).fit(covs[tr])
    np.testing.assert_allclose(x_tr, ref.transform(covs[tr]), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(x_te, ref.transform(covs[te]), rtol=1e-6, atol=1e-8)


def test_cohort_probe_recovers_a_planted_fc_signal_and_site_alone_does_not():
  rng = np.random.default_rng(0)
  n, p = 60, 6
  sites = np.repeat(["s1", "s2", "s3"], n // 3)
  dx = np.tile(["1", "2"], n // 2)

  class Rec:
    def __init__(self, i):
      x = rng.standard_normal((80, p))
      if dx[i] == "1":  # planted: parcels 0 and 1 share a signal in one class
        x[:, 1] = x[:, 0] + 0.3 * rng.standard_normal(80)
      self.signal, self.subject, self.site, self.path = x, f"sub{i}", sites[i], f"r{i}.npy"

  recs = [Rec(i) for i in range(n)]
  from brainlm_jax.transfer.features import fc_features
  fc = np.concatenate([fc_features(r.signal.T[None]) for r in recs])
  # An earlier layer carries the label, the last does not: the inner CV must find it.
  layer1 = (dx == "1")[:, None] + 0.7 * rng.standard_normal((n, 4))
  feats = WindowFeatures(features={"mean": rng.standard_normal((n, 4)).astype(np.float32),
                                   "layer1-mean": layer1.astype(np.float32),
                                   "fc": fc}, recording=np.arange(n),
                         subject=np.asarray([r.subject for r in recs]),
                         window=np.zeros(n, int), paths=[r.path for r in recs])
  res = clinical.cohort_probe(feats, recs, "DX_GROUP", {r.subject: dx[i] for i, r in
                                                         enumerate(recs)}, cv="site")
  rows = {e["name"]: e["metrics"] for e in res["feature_sets"]}
  assert set(rows) == {"mean", "layer1-mean", "model", "fc", "mean+fc", "tangent", "site"}
  choice = next(e for e in res["feature_sets"] if e["name"] == "model")
  assert choice["chosen_counts"] == {"layer1-mean": 3}  # by inner CV, in every fold
  assert rows["model"]["accuracy"]["mean"] == rows["layer1-mean"]["accuracy"]["mean"] > 0.7
  assert rows["fc"]["accuracy"]["mean"] > 0.9 and rows["tangent"]["accuracy"]["mean"] > 0.9
  assert rows["fc"]["roc_auc"]["mean"] > 0.9
  assert rows["site"]["accuracy"]["mean"] <= 0.6  # the held-out site is unseen
  assert rows["mean"]["accuracy"]["ci95"][0] < 0.5 < rows["mean"]["accuracy"]["ci95"][1] + 0.2
  test = res["paired_test"]  # the inner-CV choice against fc, same subjects
  assert test["b"] == "fc" and test["a"] == "model" and 0 <= test["p_value"] <= 1
  assert [f["name"] for f in res["folds"]] == ["s1", "s2", "s3"]
  # The folds fitted on 3 threads: the same table to the bit.
  res3 = clinical.cohort_probe(feats, recs, "DX_GROUP", {r.subject: dx[i] for i, r in
                                                          enumerate(recs)}, cv="site", n_jobs=3)
  assert res3["feature_sets"] == res["feature_sets"]


def test_planted_dead_parcel_is_left_out_of_loss_metrics_and_fc():
  """A recording's constant parcel is marked dead in every batch, and the loss, the
  reconstruction statistics, FC and tangent FC leave it out (missing, not a zero)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from brainlm_jax.data import input_pipeline, windows  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models.brainlm import masked_loss  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import metrics  # pylint: disable=import-outside-toplevel
  from brainlm_jax.transfer import features, linear  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  recs = [rng.standard_normal((60, 5)).astype(np.float32) for _ in range(2)]
  recs[0][:, 3] = 7.0  # dead in recording 0 only
  ds = input_pipeline.train_dataset(recs, scaler=None, batch_size=8, window=20, seed=0,
                                    num_steps=1, with_positions=True)
  b = next(ds.as_numpy_iterator())
  np.testing.assert_array_equal(b["live"][:, 3], (b["recording"] != 0).astype(np.float32))
  assert b["live"][:, [0, 1, 2, 4]].min() == 1.0
  # The loss: the dead parcel's error does not count, whatever the prediction there.
  target = jnp.asarray(b["signal"].reshape(8, 5, 2, 10))
  mask = jnp.ones((8, 5, 2))
  pred = jnp.zeros_like(target)
  live = jnp.asarray(b["live"])
  wild = pred + 1e3 * (1.0 - live)[:, :, None, None]  # wrong wherever the parcel is dead
  assert float(wild.max()) == 1e3
  assert float(masked_loss(wild, target, mask, live=live)) == pytest.approx(
      float(masked_loss(pred, target, mask, live=live)))
  is_live = np.asarray(live, bool)[:, :, None, None] * np.ones(target.shape, bool)
  ref = np.square(np.asarray(target))[is_live].mean()
  assert float(masked_loss(pred, target, mask, live=live)) == pytest.approx(ref, rel=1e-5)
  sums = metrics.masked_sums(wild, target, mask, live=live)
  assert float(sums["n"]) == is_live.sum()
  # Evaluation windows carry the same marks; FC pairs of the dead parcel are missing.
  wb = next(windows.iter_windows(recs, None, window=20, batch_size=8))
  assert wb.live[:3, 3].tolist() == [0, 0, 0] and wb.live[3:6].min() == 1
  fc = features.fc_features(wb.signal[:wb.n], live=wb.live[:wb.n])
  iu = np.triu_indices(5, k=1)
  with_dead = (iu[0] == 3) | (iu[1] == 3)
  assert np.isnan(fc[:3][:, with_dead]).all() and not np.isnan(fc[:3][:, ~with_dead]).any()
  assert not np.isnan(fc[3:6]).any()
  pred, _ = linear.fit_predict("regression", fc[:5], np.arange(5.0), fc[5:6], [], 0)
  assert np.isfinite(pred).all()  # imputed from the training rows
  miss = connectivity.missing_pairs(np.array([[1, 1, 1, 0, 1], [1] * 5], bool))
  il = np.tril_indices(5)
  assert np.isnan(miss[0][(il[0] == 3) | (il[1] == 3)]).all()
  assert np.nansum(miss[0]) == 10 and (miss[1] == 1).all()
