r"""The clinical probe's per-fold fit on FC features: ours vs the same sklearn pipeline, one run.

  python benchmarks/probe_fit.py                       # ABIDE, DX_GROUP, every leave-site-out fold
  python benchmarks/probe_fit.py --data DIR --target SEX --folds 4

Per leave-site-out fold, on each subject's Pearson FC (Fisher z, 200 parcels -> 19,900 columns):
  ours     `linear.classifier` (imputer, scaler, `TrainRowSpan` via the Gram matrix,
           LogisticRegressionCV over 7 C x 5 inner folds)
  svd      the same with the projection from `np.linalg.svd` of the training rows (what the probe
           did before 2026-12-05)
  scorer   ours with sklearn's "neg_log_loss" scorer for the inner CV (before 2026-12-05; ours is
           `linear.neg_log_loss`, the same value without sklearn.metrics' input checks)
  sklearn  no projection: LogisticRegressionCV on all 19,900 columns (`--sklearn-folds`, default 1;
           minutes per fold)
and the 1,000-resample bootstrap of the pooled scores: `labels.score` vs sklearn.metrics. Prints
seconds per fold, the ratios, and the largest difference in predicted probabilities / scores.
"""

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from brainlm_jax.data import cohort, datasets  # noqa: E402
from brainlm_jax.transfer import clinical, features, labels, linear  # noqa: E402


class SvdRowSpan(linear.TrainRowSpan):
  """The projection from the SVD of the training rows (the earlier implementation)."""

  def fit_transform(self, x, y=None):
    x = np.asarray(x, np.float64)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    self.basis = vt[s > s.max() * 1e-10].T
    return x @ self.basis

  def transform(self, x):
    return np.asarray(x, np.float64) @ self.basis


def _sklearn_scores(y, pred, proba, classes):
  return {"accuracy": skm.accuracy_score(y, pred),
          "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
          "roc_auc": np.mean([skm.roc_auc_score(y == c, proba[:, j])
                              for j, c in enumerate(classes)])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="../shared/data/abide_cc200", help="a cohort folder")
  parser.add_argument("--target", default="DX_GROUP")
  parser.add_argument("--folds", type=int, default=0, help="leave-site-out folds timed (0: all)")
  parser.add_argument("--sklearn-folds", type=int, default=1)
  args = parser.parse_args()
  recs, _ = datasets.load_recordings(args.data, window=2)
  group = cohort.detect(args.data, [r.path for r in recs])
  values = {}
  for r in recs:
    v = group.row(r.path).get(args.target)
    if v is not None:
      values.setdefault(r.subject, v)
  recs = [r for r in recs if r.subject in values]
  subjects = sorted({r.subject for r in recs})
  with warnings.catch_warnings():  # a parcel dead in every scan of a subject stays NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    fc = np.stack([np.nanmean(np.concatenate([
        features.fc_features(r.signal.T[None], live=(r.signal.std(0) > 0)[None])
        for r in recs if r.subject == s]), 0) for s in subjects])
  sites = np.asarray([next(r.site for r in recs if r.subject == s) for s in subjects])
  task, y = labels.target_values(args.target, [values[s] for s in subjects], subjects,
                                   "auto", option="--target")
  classes = labels.sorted_classes(y.tolist())
  splits = clinical.cohort_folds(y, np.asarray(subjects), sites, "site", 10, 0, task)
  splits = splits[:args.folds or None]
  print(f"{len(subjects)} subjects, {fc.shape[1]} FC columns, {len(splits)} folds ({task})")
  times = {"ours": [], "svd": [], "scorer": [], "sklearn": []}
  proba = np.zeros((len(y), len(classes)))
  diff = {"svd": 0.0, "scorer": 0.0, "sklearn": 0.0}
  for k, (tr, te, name) in enumerate(splits):
    fitted = {}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      for arm in ("ours", "svd", "scorer", "sklearn"):
        if arm == "sklearn" and k >= args.sklearn_folds:
          continue
        model = linear.classifier(y[tr], 0)
        if arm == "scorer":
          model.steps[-1][1].set_params(scoring="neg_log_loss")
        elif arm != "ours":
          steps = [s for s in model.steps if s[0] != "trainrowspan"]
          if arm == "svd":
            steps.insert(2, ("svd", SvdRowSpan()))
          model.steps = steps
        t = time.perf_counter()
        fitted[arm] = model.fit(fc[tr], y[tr]).predict_proba(fc[te])
        times[arm].append(time.perf_counter() - t)
    for arm in diff:
      if arm in fitted:
        diff[arm] = max(diff[arm], float(np.abs(fitted[arm] - fitted["ours"]).max()))
    proba[te] = fitted["ours"]
    print(f"  fold {name}: ours {times['ours'][-1]:.1f} s, svd {times['svd'][-1]:.1f} s, "
          f"sklearn scorer {times['scorer'][-1]:.1f} s"
          + (f", sklearn {times['sklearn'][-1]:.1f} s" if "sklearn" in fitted else ""))
  for arm in ("svd", "scorer", "sklearn"):
    if times[arm]:
      n = len(times[arm])
      print(f"ours / {arm}: {sum(times['ours'][:n]) / sum(times[arm]):.2f} over {n} fold(s) "
            f"({sum(times['ours'][:n]):.1f} s vs {sum(times[arm]):.1f} s); largest |probability "
            f"difference| {diff[arm]:.1e}")
  done = np.concatenate([te for _, te, _ in splits])
  y, proba = y[done], proba[done]
  pred = np.asarray(classes, object)[proba.argmax(1)]
  rng = np.random.default_rng(0)
  draws = [rng.integers(len(y), size=len(y)) for _ in range(1000)]
  t = time.perf_counter()
  ours = [labels.score(task, y[i], pred[i], proba[i], classes) for i in draws]
  t_ours = time.perf_counter() - t
  t = time.perf_counter()
  ref = [_sklearn_scores(y[i], pred[i], proba[i], classes) for i in draws]
  t_ref = time.perf_counter() - t
  worst = max(abs(a[m] - b[m]) for a, b in zip(ours, ref) for m in a)
  print(f"bootstrap (1,000 resamples of {len(y)}): ours {t_ours:.2f} s, sklearn.metrics "
        f"{t_ref:.2f} s, ours / sklearn = {t_ours / t_ref:.3f}; largest |difference| {worst:.1e}")


if __name__ == "__main__":
  main()
