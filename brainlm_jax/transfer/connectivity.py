"""Connectivity baselines of the clinical probe: subject covariances and tangent-space FC.

  covs = covariances([signal, ...])             [N, P, P] Ledoit-Wolf, per recording
  ts = TangentSpace()
  x_train = ts.fit_transform(covs[train])        geometric mean of the training subjects only
  x_test = ts.transform(covs[test])              [n, P (P + 1) / 2]

The tangent embedding is nilearn's `ConnectivityMeasure(kind="tangent", vectorize=True)`
(Varoquaux et al. 2010; Abraham et al. 2017): whiten each covariance by the group's geometric
(Riemannian) mean M, take the matrix logarithm log(M^-1/2 C M^-1/2), and keep its upper
triangle (diagonal divided by sqrt(2)). Same algorithm (Fletcher & Joshi's gradient descent,
tolerance 1e-7, step halving); the differences make it cheaper and leave the result the same
to that tolerance:
  * the matrices are processed as one stacked array (batched `eigh` split over the cores,
    instead of a Python loop per subject);
  * the descent may start anywhere (`init`; default the log-Euclidean mean of the same training
    matrices): the geometric mean of SPD matrices is unique, so the start only changes how many
    steps it takes. The clinical probe starts each fold from the previous fold's mean, which
    differs from the next by the ~1/16 of subjects that change places, so a fold takes a few
    steps instead of a dozen; and the logarithms there (the previous fold's training and test
    vectors) make the first step free (`init_logs`);
  * the mean returned is the last point of the descent, the one whose gradient (the mean of the
    logarithms) met the tolerance, rather than one step past it: the training vectors are then
    the logarithms the descent already computed (`fit_transform`, one pass fewer).
tests/test_cohort.py checks equality with nilearn, that a fit from a planted start equals the
plain fit, and that the free steps give the same vectors as computing them.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np
from sklearn.covariance import LedoitWolf
import threadpoolctl

__all__ = ["TangentSpace", "covariances", "log_matrices", "missing_pairs", "sym_to_vec"]

_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def covariances(signals: Sequence[np.ndarray], standardize: bool = True) -> np.ndarray:
  """Ledoit-Wolf covariance of each ``[time, parcels]`` signal -> float64 ``[N, P, P]``.

  standardize: z-score each parcel first (a constant, dead, parcel stays 0), so the matrices
  are shrunk correlations; Ledoit-Wolf keeps them positive definite even with dead parcels.
  """
  out = []
  for x in signals:
    x = np.asarray(x, np.float64)
    if standardize:
      x = x - x.mean(axis=0)
      sd = x.std(axis=0)
      x = x / np.where(sd > 0, sd, 1.0)
    out.append(LedoitWolf(store_precision=False).fit(x).covariance_)
  return np.stack(out)


def _eig_map(fn, m: np.ndarray) -> np.ndarray:
  """fn applied to the eigenvalues of symmetric matrices ``[..., P, P]``; a stack is split over
  the CPU's cores (LAPACK releases the GIL)."""
  if m.ndim == 3 and len(m) >= 2 * _THREADS > 2:
    # One BLAS thread per worker: OpenBLAS's own threads on top of ours overflow its buffer pool
    # ("BLAS : Bad memory unallocation!").
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"), \
        concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      return np.concatenate(list(pool.map(lambda c: _eig_map(fn, c),
                                          np.array_split(m, _THREADS))))
  vals, vecs = np.linalg.eigh(m)
  return (vecs * fn(vals)[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def sym_to_vec(m: np.ndarray) -> np.ndarray:
  """``[..., P, P]`` -> ``[..., P (P + 1) / 2]``: one triangle with the diagonal divided by
  sqrt(2) (nilearn's `sym_matrix_to_vec`: the vector's norm is the matrix's over sqrt(2))."""
  il = np.tril_indices(m.shape[-1])  # nilearn's order: lower triangle, row by row
  scale = np.where(il[0] == il[1], 1.0 / np.sqrt(2.0), 1.0)
  return m[..., il[0], il[1]] * scale


def missing_pairs(live: np.ndarray) -> np.ndarray:
  """live bool [N, P] (False: a dead parcel) -> float [N, P (P + 1) / 2] in `sym_to_vec`'s
  order: NaN for the entries of a dead parcel's row and column, 1 elsewhere (multiply a tangent
  vector by it to mark those entries missing)."""
  live = np.asarray(live, bool)
  ok = sym_to_vec((live[:, :, None] & live[:, None, :]).astype(np.float64))
  return np.where(ok > 0, 1.0, np.nan)


def log_matrices(covs: np.ndarray) -> np.ndarray:
  """Matrix logarithms ``[n, P, P]``: their mean, exponentiated, is the log-Euclidean mean where
  the descent starts."""
  return _eig_map(np.log, np.asarray(covs, np.float64))


class TangentSpace:
  """Tangent-space embedding at the geometric mean of the matrices given to `fit`.

  After `fit`: mean_ [P, P] (the last point of the descent, the one whose gradient met the
  tolerance), whitening_ = mean_^-1/2, and logs_ [n, P, P], the fitted matrices' logarithms at
  mean_ (their tangent vectors, which the descent computed to check the gradient: `fit_transform`
  returns them without another pass)."""

  def __init__(self, max_iter: int = 30, tol: float = 1e-7):
    self.max_iter, self.tol = max_iter, tol
    self.mean_ = self.whitening_ = self.logs_ = None
    self.n_iter_ = 0

  def fit(self, covs: np.ndarray, logs: np.ndarray | None = None,
          init: np.ndarray | None = None, init_logs: np.ndarray | None = None) -> "TangentSpace":
    """Geometric mean of `covs` ``[n, P, P]`` (SPD). `logs`: their matrix logarithms, if already
    computed (per-subject transforms, computed once for every fold: `log_matrices`). `init`: where
    the descent starts (default: the log-Euclidean mean of `covs`); the mean is unique, so the
    start changes the number of steps, not the result (to the tolerance). `init_logs`: the
    logarithms of `covs` whitened by `init` (`log_map` of a TangentSpace fitted there), if known:
    the first step is then free."""
    covs = np.asarray(covs, np.float64)
    if init is not None:
      gmean = np.asarray(init, np.float64)
    else:
      gmean, init_logs = _eig_map(
          np.exp, (log_matrices(covs) if logs is None else logs).mean(axis=0)), None
    norm_old, step = np.inf, 1.0
    for it in range(1, self.max_iter + 1):
      vals, vecs = np.linalg.eigh(gmean)
      if it == 1 and init_logs is not None:
        tangent = np.asarray(init_logs, np.float64)
      else:
        inv_sqrt = (vecs / np.sqrt(vals)) @ vecs.T
        tangent = _eig_map(np.log, inv_sqrt @ covs @ inv_sqrt)
      logs_mean = tangent.mean(axis=0)
      if np.isnan(logs_mean).any():
        raise FloatingPointError("NaN after the matrix logarithm: a matrix is not SPD")
      norm = np.linalg.norm(logs_mean)
      self.n_iter_ = it
      if norm / gmean.size < self.tol or it == self.max_iter:
        break  # gmean's gradient (logs_mean) is below the tolerance: gmean is the mean
      sqrt = (vecs * np.sqrt(vals)) @ vecs.T
      gmean = sqrt @ _eig_map(lambda v: np.exp(v * step), logs_mean) @ sqrt
      if norm < norm_old:
        norm_old = norm
      elif norm > norm_old:
        step = step / 2.0
    self.mean_, self.logs_ = gmean, tangent
    self.whitening_ = _eig_map(lambda v: 1.0 / np.sqrt(v), gmean)
    return self

  def log_map(self, covs: np.ndarray) -> np.ndarray:
    """``[n, P, P]`` -> their logarithms at the fitted mean, log(M^-1/2 C M^-1/2) ``[n, P, P]``."""
    if self.whitening_ is None:
      raise ValueError("TangentSpace used before fit")
    w = self.whitening_
    return _eig_map(np.log, w @ np.asarray(covs, np.float64) @ w)

  def transform(self, covs: np.ndarray) -> np.ndarray:
    """``[n, P, P]`` -> ``[n, P (P + 1) / 2]`` tangent vectors at the fitted mean."""
    return sym_to_vec(self.log_map(covs))

  def fit_transform(self, covs: np.ndarray, **kwargs) -> np.ndarray:
    """`fit` (same arguments), then the fitted matrices' tangent vectors (from the descent's
    last step: equal to `transform(covs)` without computing them again)."""
    return sym_to_vec(self.fit(covs, **kwargs).logs_)
