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
  * the matrices are processed as one stacked array (instead of a Python loop per subject),
    from the main thread cut into one chunk per core, each chunk whitened, decomposed (`eigh`)
    and rebuilt on its own thread;
  * each step is Anderson-accelerated (`TangentSpace(memory=2)`; `memory=0` is nilearn's plain
    descent): in the log chart at the start point the Fletcher-Joshi step is a fixed-point
    map, and the next point combines the last three steps so that their residuals cancel
    best; nilearn's stopping test (the gradient's norm) and step halving are unchanged, so the
    point where it stops is a geometric mean to the same tolerance, reached in fewer passes
    over the matrices (ABIDE, 787 subjects: 5 instead of 12);
  * the descent may start anywhere (`init`; default the log-Euclidean mean of the same training
    matrices): the geometric mean of SPD matrices is unique, so the start only changes how many
    steps it takes. `FoldTangents` (the clinical probe's folds) fits the mean of all subjects
    once and starts every fold there, whose logarithms make the first step free
    (`init_logs`): a leave-site-out fold, which differs from it by one site, then takes 4
    passes (the first free) instead of 12;
  * the mean returned is the last point of the descent, the one whose gradient (the mean of the
    logarithms) met the tolerance, rather than one step past it: the training vectors are then
    the logarithms the descent already computed (`fit_transform`, one pass fewer).
tests/test_cohort.py checks equality with nilearn (both step rules), that Anderson mixing takes
fewer steps to the same mean, that a fit from a planted (leaky) start equals the plain fit,
and that the free steps give the same vectors as computing them.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Sequence
import warnings

import numpy as np
from sklearn.covariance import LedoitWolf
import threadpoolctl

__all__ = ["FoldTangents", "TangentSpace", "covariances", "log_matrices", "missing_pairs",
           "sym_to_vec"]

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


def _eig_apply(fn, m: np.ndarray, whiten: np.ndarray | None) -> np.ndarray:
  if whiten is not None:
    m = whiten @ m @ whiten
  vals, vecs = np.linalg.eigh(m)
  return (vecs * fn(vals)[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def _eig_map(fn, m: np.ndarray, whiten: np.ndarray | None = None) -> np.ndarray:
  """fn applied to the eigenvalues of symmetric matrices ``[..., P, P]`` (first whitened,
  W m W, when `whiten` W is given). Called from the main thread, a stack is cut into one chunk
  per CPU core, each whitened, decomposed and rebuilt on its own thread (LAPACK and BLAS release
  the GIL), on one BLAS thread each; called from another thread (the clinical probe's jobs, whose
  caller sets the BLAS threads once), it runs in that thread: the BLAS thread limit is
  process-wide, so only the main thread changes it."""
  if (m.ndim == 3 and len(m) >= 2 and _THREADS > 1
      and threading.current_thread() is threading.main_thread()):
    chunks = np.array_split(m, min(_THREADS, len(m)))
    # One BLAS thread per worker: OpenBLAS's own threads on top of ours overflow its buffer pool
    # ("BLAS : Bad memory unallocation!").
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"), \
        concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
      return np.concatenate(list(pool.map(lambda c: _eig_apply(fn, c, whiten), chunks)))
  return _eig_apply(fn, m, whiten)


def _anderson(history: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  """Type-II Anderson mixing of a fixed-point iteration x -> g(x) from its last pairs
  (x_k, g(x_k)), flattened: the combination of the last steps whose residuals g(x) - x cancel
  best (least squares), mapped through g. One pair: plain g(x)."""
  x, g = (np.stack(v) for v in zip(*history))
  if len(history) < 2:
    return g[-1]
  f = g - x
  gamma = np.linalg.lstsq((f[1:] - f[:-1]).T, f[-1], rcond=None)[0]
  return g[-1] - gamma @ (g[1:] - g[:-1])


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
  returns them without another pass). n_iter_: the points visited (passes over the matrices,
  the free first one included); converged_: False (and a warning, as nilearn's) when max_iter
  ran out first.

  memory: how many earlier steps Anderson mixing combines (0: nilearn's plain descent)."""

  def __init__(self, max_iter: int = 30, tol: float = 1e-7, memory: int = 2):
    self.max_iter, self.tol, self.memory = max_iter, tol, memory
    self.mean_ = self.whitening_ = self.logs_ = None
    self.n_iter_, self.converged_ = 0, False

  def fit(self, covs: np.ndarray, logs: np.ndarray | None = None,
          init: np.ndarray | None = None, init_logs: np.ndarray | None = None) -> "TangentSpace":
    """Geometric mean of `covs` ``[n, P, P]`` (SPD). `logs`: their matrix logarithms, if already
    computed (`log_matrices`). `init`: where the descent starts (default: the log-Euclidean mean
    of `covs`); the mean is unique, so the start changes the number of steps, not the result
    (to the tolerance). `init_logs`: the logarithms of `covs` whitened by `init` (`logs_` or
    `log_map` of a TangentSpace fitted at `init`), if known: the first step is then free.

    Each step is Fletcher & Joshi's, gmean^1/2 exp(step * mean log(gmean^-1/2 C gmean^-1/2))
    gmean^1/2, with nilearn's stopping test and step halving; with memory > 0 the points are
    written in the log chart at the start, X = log(g0^-1/2 gmean g0^-1/2), where the step is a
    fixed-point map X -> G(X), and the next point mixes the last `memory` + 1 steps
    (`_anderson`). A step whose gradient grows halves the step size and forgets the history."""
    covs = np.asarray(covs, np.float64)
    if init is not None:
      g0 = np.asarray(init, np.float64)
    else:
      g0, init_logs = _eig_map(
          np.exp, (log_matrices(covs) if logs is None else logs).mean(axis=0)), None
    vals, vecs = np.linalg.eigh(g0)
    g0_sqrt, g0_isqrt = (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T
    gmean, x = g0, np.zeros_like(g0)  # x: gmean in the chart at g0
    history, norm_old, step = [], np.inf, 1.0
    for it in range(1, self.max_iter + 1):
      vals, vecs = np.linalg.eigh(gmean)
      if it == 1 and init_logs is not None:
        tangent = np.asarray(init_logs, np.float64)
      else:
        tangent = _eig_map(np.log, covs, whiten=(vecs / np.sqrt(vals)) @ vecs.T)
      logs_mean = tangent.mean(axis=0)
      if np.isnan(logs_mean).any():
        raise FloatingPointError("NaN after the matrix logarithm: a matrix is not SPD")
      norm = np.linalg.norm(logs_mean)
      self.n_iter_ = it
      self.converged_ = norm / gmean.size < self.tol
      if self.converged_:
        break  # gmean's gradient (logs_mean) is below the tolerance: gmean is the mean
      if it == self.max_iter:
        warnings.warn(f"TangentSpace: {self.max_iter} steps without reaching the tolerance "
                      f"{self.tol} (gradient {norm / gmean.size:.2e})")
        break
      sqrt = (vecs * np.sqrt(vals)) @ vecs.T
      plain = sqrt @ _eig_map(lambda v, s=step: np.exp(v * s), logs_mean) @ sqrt
      if norm < norm_old:
        norm_old = norm
      elif norm > norm_old:  # as nilearn: this step at the old size, the next ones halved
        step, history = step / 2.0, []
      if not self.memory:
        gmean = plain
        continue
      history = history[-self.memory:] + [(x, _eig_map(np.log, plain, whiten=g0_isqrt))]
      x = _anderson([(a.ravel(), b.ravel()) for a, b in history]).reshape(x.shape)
      x = (x + x.T) / 2.0
      gmean = g0_sqrt @ _eig_map(np.exp, x) @ g0_sqrt
    self.mean_, self.logs_ = gmean, tangent
    self.whitening_ = _eig_map(lambda v: 1.0 / np.sqrt(v), gmean)
    return self

  def log_map(self, covs: np.ndarray) -> np.ndarray:
    """``[n, P, P]`` -> their logarithms at the fitted mean, log(M^-1/2 C M^-1/2) ``[n, P, P]``."""
    if self.whitening_ is None:
      raise ValueError("TangentSpace used before fit")
    return _eig_map(np.log, np.asarray(covs, np.float64), whiten=self.whitening_)

  def transform(self, covs: np.ndarray) -> np.ndarray:
    """``[n, P, P]`` -> ``[n, P (P + 1) / 2]`` tangent vectors at the fitted mean."""
    return sym_to_vec(self.log_map(covs))

  def fit_transform(self, covs: np.ndarray, **kwargs) -> np.ndarray:
    """`fit` (same arguments), then the fitted matrices' tangent vectors (from the descent's
    last step: equal to `transform(covs)` without computing them again)."""
    return sym_to_vec(self.fit(covs, **kwargs).logs_)


class FoldTangents:
  """Tangent vectors per cross-validation fold, each at the geometric mean of its own training
  matrices: ``folds(train, test) -> (x_train [n_train, P (P + 1) / 2], x_test [n_test, ...])``.

  Every fold's descent starts at one anchor, the geometric mean of all the matrices (fitted once,
  on the first call), whose logarithms make each fold's first step free. The anchor is only a
  start: a fold's mean is unique and the descent stops on that fold's own gradient, so the
  start changes the steps taken (4 instead of 12 on ABIDE's leave-site-out folds), not the
  result, to the tolerance (tests/test_cohort.py plants a leaky start). Thread-safe: folds may
  be fitted side by side.

  covs: ``[N, P, P]``, or a function returning them, called once, on the first call.
  """

  def __init__(self, covs, **tangent_kwargs):
    self._covs, self._kwargs = covs, tangent_kwargs
    self._lock = threading.Lock()
    self.anchor = None

  def start(self) -> tuple[np.ndarray, "TangentSpace"]:
    """(covs, the anchor's TangentSpace), fitted on the first call only."""
    with self._lock:
      if self.anchor is None:
        if callable(self._covs):
          self._covs = np.asarray(self._covs(), np.float64)
        self.anchor = TangentSpace(**self._kwargs).fit(self._covs)
    return self._covs, self.anchor

  def fit(self, train: np.ndarray) -> "TangentSpace":
    """The TangentSpace of the matrices `train` indexes (its logs_: their logarithms)."""
    covs, anchor = self.start()
    return TangentSpace(**self._kwargs).fit(covs[train], init=anchor.mean_,
                                            init_logs=anchor.logs_[train])

  def __call__(self, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ts = self.fit(train)
    return sym_to_vec(ts.logs_), ts.transform(self._covs[test])
