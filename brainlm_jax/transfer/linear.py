"""The linear probes: StandardScaler + RidgeCV (regression) or LogisticRegressionCV
(classification), their penalty chosen by inner cross-validation on the training rows only.
Missing features (NaN: the FC pairs of a recording's dead parcels) are imputed with the
training rows' mean first.

  pred, proba = fit_predict(task, x_train, y_train, x_test, classes, seed)
"""

from __future__ import annotations

import collections
import inspect
import warnings

import numpy as np
from sklearn import base as sk_base
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

RIDGE_ALPHAS = np.logspace(-3, 7, 21)
LOGISTIC_CS = np.logspace(-4, 2, 7)
INNER_FOLDS = 5


class TrainRowSpan(sk_base.TransformerMixin, sk_base.BaseEstimator):
  """Projects features onto the span of the training rows when F > n: [n, F] -> [n, r].

  Lossless for L2-penalised linear models: their weights lie in that span, so scores on any
  row, and the inner-CV choice of the penalty, are unchanged; fitting is just much cheaper
  (the FC features have P (P - 1) / 2 columns, e.g. 89,676 for 424 parcels). The basis comes
  from the [n, n] Gram matrix, x x^T = U diag(s^2) U^T: basis = x^T U / s, so a row v maps to
  (v x^T) U / s, never formed as [F, r]: ~2 n^2 F flops instead of an SVD of x (7x faster at
  n = 740, F = 19,900). Directions with s^2 below 1e-10 of the largest (the one the scaler's
  centring removes) are dropped.
  """

  def fit_transform(self, x, y=None):  # pylint: disable=unused-argument
    x = np.asarray(x, np.float64)
    self.rows_ = None
    if x.shape[1] <= x.shape[0]:
      return x
    eig, u = np.linalg.eigh(x @ x.T)
    keep = eig > eig[-1] * 1e-10
    if eig[-1] <= 0 or not keep.any():  # all-zero features: one (zero) column
      keep[-1], eig[-1] = True, 1.0
    s = np.sqrt(eig[keep])
    self.rows_, self.proj_ = x, u[:, keep] / s  # basis [F, r] = rows_^T proj_, orthonormal
    return u[:, keep] * s  # = x @ basis

  def fit(self, x, y=None):
    self.fit_transform(x, y)
    return self

  @property
  def basis_(self):
    """The orthonormal basis [F, r] of the training rows' span (None: F <= n, no projection)."""
    return None if self.rows_ is None else self.rows_.T @ self.proj_

  def transform(self, x):
    if self.rows_ is None:
      return x
    return (np.asarray(x, np.float64) @ self.rows_.T) @ self.proj_


def neg_log_loss(estimator, x, y) -> float:
  """sklearn's "neg_log_loss" scorer (probabilities clipped to [eps, 1 - eps], natural log, mean
  over rows), for the labels the estimator knows: the same value without sklearn.metrics' input
  validation, which took two thirds of every LogisticRegressionCV fit here (tests/test_labels.py
  checks the inner-CV scores are equal)."""
  proba = estimator.predict_proba(x)
  eps = np.finfo(proba.dtype).eps
  true = proba[np.arange(len(y)), np.searchsorted(estimator.classes_, y)]
  return float(np.mean(np.log(np.clip(true, eps, 1 - eps))))


def _imputer():
  """Training-row means for NaN features (all-NaN columns: 0), a no-op without NaN."""
  return SimpleImputer(strategy="mean", keep_empty_features=True)


def regressor():
  return make_pipeline(_imputer(), StandardScaler(), TrainRowSpan(), RidgeCV(alphas=RIDGE_ALPHAS))


def classifier(y_train: np.ndarray, seed: int, groups: np.ndarray | None = None):
  """LogisticRegressionCV with stratified inner folds (as many as the rarest class allows, <= 5);
  a fixed C=1 when some class has a single training sample.

  groups [n] (e.g. the recording of each window): the inner folds keep a group's rows together
  (StratifiedGroupKFold, as many folds as the class with the fewest groups allows), so the
  penalty is chosen on rows from other recordings than those it was fitted on; rows of one
  group on both sides would score telling windows of one scan apart. Fewer than 2 groups in
  some class: stratified folds over rows, as without groups."""
  counts = collections.Counter(y_train.tolist())
  k = min(INNER_FOLDS, min(counts.values()))
  if k < 2:
    return make_pipeline(_imputer(), StandardScaler(), TrainRowSpan(),
                         LogisticRegression(C=1.0, max_iter=2000))
  cv = StratifiedKFold(k, shuffle=True, random_state=seed)
  if groups is not None:
    per_class = collections.defaultdict(set)
    for c, g in zip(y_train.tolist(), np.asarray(groups).tolist()):
      per_class[c].add(g)
    k_groups = min(INNER_FOLDS, min(len(v) for v in per_class.values()))
    if k_groups >= 2:
      splitter = StratifiedGroupKFold(k_groups, shuffle=True, random_state=seed)
      cv = list(splitter.split(np.zeros(len(y_train)), y_train, groups))
  kwargs = {}
  params = inspect.signature(LogisticRegressionCV).parameters
  if "use_legacy_attributes" in params:  # sklearn >= 1.8: l1_ratios=(0,) is the L2 penalty
    kwargs.update(l1_ratios=(0.0,), use_legacy_attributes=False)
  clf = LogisticRegressionCV(Cs=LOGISTIC_CS, cv=cv, scoring=neg_log_loss, max_iter=2000, **kwargs)
  return make_pipeline(_imputer(), StandardScaler(), TrainRowSpan(), clf)


def inner_score(model) -> float:
  """The fitted probe's inner-CV score at its chosen penalty, from the training rows only
  (RidgeCV: leave-one-out negative MSE; LogisticRegressionCV: mean negative log-loss over the
  inner folds); NaN for the fixed-C fallback. Higher is better: what picks a layer/pooling."""
  est = model[-1]
  if isinstance(est, RidgeCV):
    return float(est.best_score_)
  if isinstance(est, LogisticRegressionCV):
    scores = est.scores_
    scores = np.asarray(next(iter(scores.values())) if isinstance(scores, dict) else scores)
    return float(scores.reshape(scores.shape[0], -1).mean(axis=0).max())  # [folds, (l1,) Cs]
  return float("nan")


def fit_predict(task: str, x_tr, y_tr, x_te, classes: list, seed: int, *,
                with_score: bool = False, groups: np.ndarray | None = None):
  """Fits the probe on the training rows -> (pred [m], proba [m, classes] | None); (None, None)
  for a classification whose training rows hold a single class. with_score: also the
  `inner_score` (pred, proba, score). groups: the training rows' groups for the inner folds of a
  classification (`classifier`)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    if task == "regression":
      model = regressor().fit(x_tr, y_tr)
      out = model.predict(x_te), None
    elif len(set(y_tr.tolist())) < 2:
      model, out = None, (None, None)
    else:
      model = classifier(y_tr, seed, groups).fit(x_tr, y_tr)
      proba = np.zeros((len(x_te), len(classes)))
      proba[:, [classes.index(c) for c in model.classes_]] = model.predict_proba(x_te)
      out = model.predict(x_te), proba
  if with_score:
    return (*out, float("nan") if model is None else inner_score(model))
  return out
