r"""Tangent-space FC per leave-site-out fold: ours (transfer/connectivity.py) vs nilearn, one run.

  python benchmarks/tangent.py                              # ABIDE, all folds ours, 2 nilearn
  python benchmarks/tangent.py --data DIR --nilearn-folds 16 --memory 0

Both fit the geometric mean of each fold's training subjects (Ledoit-Wolf covariances of the
z-scored CC200 signals, the same matrices) to nilearn's tolerance (1e-7, at most 30 steps):
nilearn's `_geometric_mean` (what `ConnectivityMeasure(kind="tangent").fit` runs) from the
arithmetic mean; ours as the clinical probe runs it (`FoldTangents`): batched, Anderson-mixed
steps (`--memory`, 0 = nilearn's plain steps), one anchor fitted on all subjects (timed) and
every fold started there with its logarithms (the first step free), and ours also takes every
subject's tangent vector (the training ones from the descent's last step); nilearn's time is
the mean alone. Prints seconds and steps per fold, the ratio, and how far apart the means and
the tangent vectors are.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from brainlm_jax.data import datasets  # noqa: E402
from brainlm_jax.transfer import connectivity  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--nilearn-folds", type=int, default=2,
                      help="folds nilearn also fits (each takes minutes)")
  parser.add_argument("--data", default="../shared/data/abide_cc200", help="a cohort folder")
  parser.add_argument("--memory", type=int, default=2,
                      help="Anderson memory of our steps (0: nilearn's plain steps)")
  args = parser.parse_args()
  from nilearn.connectome.connectivity_matrices import _geometric_mean  # pylint: disable=import-outside-toplevel
  recs, _ = datasets.load_recordings(args.data, window=2)
  sites = np.asarray([r.site or "" for r in recs])
  t = time.perf_counter()
  covs = connectivity.covariances([r.signal for r in recs])
  print(f"{len(recs)} recordings, {len(set(sites))} sites, {covs.shape[1]} parcels; "
        f"covariances {time.perf_counter() - t:.1f} s")
  t = time.perf_counter()
  folds_ts = connectivity.FoldTangents(covs, memory=args.memory)
  folds_ts.start()  # the anchor: the mean of all subjects, where every fold starts
  anchor_s = time.perf_counter() - t
  print(f"anchor (all {len(covs)} subjects): {anchor_s:.1f} s, {folds_ts.anchor.n_iter_} steps")
  ours, steps = [], []
  folds = sorted(set(sites))
  for site in folds:  # as the clinical probe does: every fold's training and test vectors
    tr = sites != site
    t = time.perf_counter()
    ts = folds_ts.fit(tr)
    connectivity.sym_to_vec(ts.logs_), ts.transform(covs[~tr])
    ours.append(time.perf_counter() - t)
    steps.append(ts.n_iter_)
  print(f"ours: {anchor_s + sum(ours):.1f} s for {len(folds)} folds, anchor included "
        f"(steps {steps}, the first free)")
  theirs = []
  for site in folds[:args.nilearn_folds]:
    tr = sites != site
    t = time.perf_counter()
    ref = _geometric_mean(list(covs[tr]), max_iter=30, tol=1e-7)
    theirs.append(time.perf_counter() - t)
    mine = folds_ts.fit(tr)
    vec = lambda m: connectivity.sym_to_vec(connectivity._eig_map(  # noqa: E731  # pylint: disable=protected-access
        np.log, covs[~tr], whiten=_whiten(m)))
    print(f"  fold {site}: nilearn {theirs[-1]:.1f} s; max |mean diff| / max |mean| "
          f"{np.abs(ref - mine.mean_).max() / np.abs(ref).max():.2e}; max |tangent diff| "
          f"{np.abs(vec(ref) - vec(mine.mean_)).max():.2e}")
  per = np.mean(theirs)
  print(f"nilearn: {per:.1f} s per fold -> {per * len(folds):.0f} s for {len(folds)} folds; "
        f"ours / nilearn = {(anchor_s + sum(ours)) / (per * len(folds)):.3f}")


def _whiten(m):
  vals, vecs = np.linalg.eigh(m)
  return (vecs / np.sqrt(vals)) @ vecs.T


if __name__ == "__main__":
  main()
