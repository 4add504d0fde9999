"""Linear probing: how much of a target is linearly readable from pretrained embeddings?

Feature sets (all from the same windows, in the same run and table):
  cls, mean                 the pretrained encoder's CLS token / mean of the other tokens  [n, D]
  random-cls, random-mean   the same from a randomly initialised encoder of the same config
  fc                        functional connectivity: upper triangle of the parcel x parcel
                            Pearson correlation of each (scaled) window, Fisher z by default
                                                                             [n, P (P - 1) / 2]
Targets:
  a phenotype column        (a CSV/TSV with a subject column): one row per subject, window
                            features averaged per subject; regression or classification.
  subject-id                fingerprinting: windows from the first half of each recording train
                            a multi-class classifier, the second half tests it, and vice versa;
                            metrics on the pooled test windows, CI over subjects (2 folds give
                            no useful t-interval).
  site                      a phenotype column, or without a phenotype file the parent folder
                            of each recording; classification.
Probes: StandardScaler + RidgeCV (alpha by efficient leave-one-out) or LogisticRegressionCV
(C by stratified inner CV), outer folds split by subject (every feature set sees the same
folds; features are first projected, losslessly, onto the span of the training rows, so the
FC's P (P - 1) / 2 columns cost little). Metrics are mean and 95% t-interval over the outer
folds (over subjects for subject-id).

  feats = extract_features(pre, recordings)          # restore.load_pretrained(...) -> pre
  results = run_probe(feats, "age", phenotypes="participants.tsv")
  write_report(results, "out/")                      # probe.json, probe.md, probe.png
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import inspect
import json
import math
import os
import warnings
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from sklearn import base as sk_base
from sklearn import metrics as skm
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
import threadpoolctl

from brainlm_jax import recordings as recordings_lib
from brainlm_jax import restore

FEATURE_SETS = ("cls", "mean", "random-cls", "random-mean", "fc")
SOURCE = {"cls": "model", "mean": "model", "random-cls": "random-init",
          "random-mean": "random-init", "fc": "fc"}
BUILTIN_TARGETS = ("subject-id", "site")
TASKS = ("auto", "regression", "classification")
METRICS = {"regression": ("r2", "mae", "pearson_r"),
           "classification": ("accuracy", "balanced_accuracy", "roc_auc")}
MAIN_METRIC = {"regression": "r2", "classification": "balanced_accuracy",
               "subject-id": "accuracy"}
LOWER_IS_BETTER = frozenset({"mae"})
MAX_CLASSES_FOR_AUTO = 10  # <= this many distinct integer values: classification

RIDGE_ALPHAS = np.logspace(-3, 7, 21)
LOGISTIC_CS = np.logspace(-4, 2, 7)
INNER_FOLDS = 5
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


# ----------------------------------------------------------------------------------------------
# Features.


@dataclasses.dataclass
class WindowFeatures:
  """Per-window features. features: name -> float32 [n, F]; recording, window int [n]; subject
  str [n]; paths: the recordings' files (indexed by `recording`)."""
  features: dict[str, np.ndarray]
  recording: np.ndarray
  subject: np.ndarray
  window: np.ndarray
  paths: list[str]


def fc_features(signal: np.ndarray, fisher_z: bool = True) -> np.ndarray:
  """signal [n, P, W] -> float32 [n, P (P - 1) / 2]: upper triangle (k=1) of each window's
  parcel x parcel Pearson correlation, arctanh-ed (clipped at |r| < 1 - 1e-6) if fisher_z."""
  x = np.asarray(signal, np.float64)
  x = x - x.mean(axis=-1, keepdims=True)
  norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
  x = x / np.where(norm > 0, norm, 1.0)
  corr = np.einsum("npw,nqw->npq", x, x)
  iu = np.triu_indices(x.shape[1], k=1)
  r = corr[:, iu[0], iu[1]]
  if fisher_z:
    r = np.arctanh(np.clip(r, -1 + 1e-6, 1 - 1e-6))
  return r.astype(np.float32)


def extract_features(pre, recordings: Sequence, *, batch_size: int = 32, seed: int = 0,
                     fisher_z: bool = True,
                     feature_sets: Sequence[str] = FEATURE_SETS) -> WindowFeatures:
  """One pass over every non-overlapping window of `recordings` (scaled with `pre.scaler`).

  Args:
    pre: a `restore.Pretrained`.
    recordings: `Recording`s with pre.model_cfg.num_parcels parcels.
    seed: seed of the random-init encoder.
    feature_sets: a subset of FEATURE_SETS.
  """
  unknown = sorted(set(feature_sets) - set(FEATURE_SETS))
  if unknown:
    raise ValueError(f"unknown feature set(s) {unknown}; choose from {FEATURE_SETS}")
  restore.check_inputs(pre, recordings)
  encoders = {}
  if {"cls", "mean"} & set(feature_sets):
    encoders[""] = pre.params
  if {"random-cls", "random-mean"} & set(feature_sets):
    encoders["random-"] = restore.random_init(pre, seed).params
  fn = restore.encoder_fn(pre.model_cfg)
  coords = None if pre.coords is None else jnp.asarray(pre.coords)
  out = collections.defaultdict(list)
  rec, win = [], []
  for b in restore.iter_windows(recordings, pre.scaler, window=pre.model_cfg.window,
                                batch_size=batch_size):
    for prefix, params in encoders.items():
      cls, mean = jax.device_get(fn(params, b.signal, coords))
      out[prefix + "cls"].append(cls[:b.n])
      out[prefix + "mean"].append(mean[:b.n])
    if "fc" in feature_sets:
      out["fc"].append(fc_features(b.signal[:b.n], fisher_z))
    rec.append(b.recording), win.append(b.window)
  rec = np.concatenate(rec)
  subjects = np.asarray([r.subject for r in recordings])
  return WindowFeatures(
      features={k: np.concatenate(out[k]) for k in FEATURE_SETS if k in feature_sets},
      recording=rec, subject=subjects[rec], window=np.concatenate(win),
      paths=[r.path for r in recordings])


# ----------------------------------------------------------------------------------------------
# Targets.


def _norm_subject(s: str) -> str:
  s = str(s).strip()
  return s[4:] if s.lower().startswith("sub-") else s


def _as_float(v: str) -> float | None:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def read_phenotypes(path: str, subject_column: str, target: str) -> dict[str, str]:
  """A CSV/TSV (delimiter from the suffix, else sniffed) -> {subject: value} for `target`.

  Rows with a missing value (empty, NA, n/a, nan, ...) are dropped. Subjects are compared with
  any 'sub-' prefix removed. Raises FileNotFoundError / ValueError naming the file and listing
  its columns when a column is missing.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: phenotype file not found")
  with open(path, "r", encoding="utf-8-sig", newline="") as f:
    text = f.read()
  lower = path.lower()
  if lower.endswith((".tsv", ".tab")):
    delimiter = "\t"
  elif lower.endswith(".csv"):
    delimiter = ","
  else:
    try:
      delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",\t;").delimiter
    except csv.Error:
      delimiter = ","
  rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
  rows = [r for r in rows if any(c.strip() for c in r)]
  if not rows:
    raise ValueError(f"{path}: empty phenotype file")
  header = [c.strip() for c in rows[0]]
  for col, what in ((subject_column, "subject column (--subject-column)"),
                    (target, "target column (--target)")):
    if col not in header:
      raise ValueError(f"{path}: no {what} {col!r}; available columns: {', '.join(header)}")
  si, ti = header.index(subject_column), header.index(target)
  values: dict[str, str] = {}
  for line, r in enumerate(rows[1:], start=2):
    if max(si, ti) >= len(r):
      continue
    subject, value = _norm_subject(r[si]), r[ti].strip()
    if not subject or value.lower() in _MISSING:
      continue
    if subject in values and values[subject] != value:
      logging.warning("%s line %d: subject %s appears again with %s=%r (kept %r)", path, line,
                      subject, target, value, values[subject])
      continue
    values.setdefault(subject, value)
  return values


def infer_task(values: Sequence[str], subjects: Sequence[str] | None = None) -> str:
  """'classification' for non-numeric values, or integers with <= 10 distinct values that
  repeat (at most half as many distinct values as subjects: a diagnosis coded 0/1/2, not the
  ages of a small cohort); else 'regression'. With `subjects` (one per value: windows or
  recordings repeat their subject's value), each subject counts once."""
  if subjects is not None:
    values = list(dict(zip(subjects, values)).values())
  nums = [_as_float(v) for v in values]
  if any(v is None for v in nums):
    return "classification"
  distinct = set(nums)
  if (all(float(v).is_integer() for v in distinct) and len(distinct) <= MAX_CLASSES_FOR_AUTO
      and 2 * len(distinct) <= len(nums)):
    return "classification"
  return "regression"


def _class_label(v: str) -> str:
  f = _as_float(v)
  return str(int(f)) if f is not None and f.is_integer() else str(v).strip()


def _sorted_classes(labels) -> list[str]:
  labels = sorted(set(labels))
  nums = [_as_float(v) for v in labels]
  if all(v is not None for v in nums):
    return [l for _, l in sorted(zip(nums, labels))]
  return labels


# ----------------------------------------------------------------------------------------------
# Probes and metrics.


class _TrainRowSpan(sk_base.TransformerMixin, sk_base.BaseEstimator):
  """Projects features onto the span of the (centred) training rows when F > n: [n, F] -> [n, r].

  Lossless for L2-penalised linear models: their weights lie in that span, so scores on any
  row, and the inner-CV choice of the penalty, are unchanged; fitting is just much cheaper
  (the FC features have P (P - 1) / 2 columns, e.g. 89,676 for 424 parcels).
  """

  def fit(self, x, y=None):  # pylint: disable=unused-argument
    self.basis_ = None
    if x.shape[1] > x.shape[0]:
      _, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
      keep = s > s.max() * 1e-10 if s.size and s.max() > 0 else np.zeros_like(s, bool)
      self.basis_ = vt[keep].T if keep.any() else vt[:1].T
    return self

  def transform(self, x):
    return x if self.basis_ is None else np.asarray(x, np.float64) @ self.basis_


def _regressor():
  return make_pipeline(StandardScaler(), _TrainRowSpan(), RidgeCV(alphas=RIDGE_ALPHAS))


def _classifier(y_train: np.ndarray, seed: int):
  """LogisticRegressionCV with stratified inner folds (as many as the rarest class allows, <= 5);
  a fixed C=1 when some class has a single training sample."""
  k = min(INNER_FOLDS, min(collections.Counter(y_train.tolist()).values()))
  if k < 2:
    return make_pipeline(StandardScaler(), _TrainRowSpan(),
                         LogisticRegression(C=1.0, max_iter=2000))
  kwargs = {}
  params = inspect.signature(LogisticRegressionCV).parameters
  if "use_legacy_attributes" in params:  # sklearn >= 1.8: l1_ratios=(0,) is the L2 penalty
    kwargs.update(l1_ratios=(0.0,), use_legacy_attributes=False)
  clf = LogisticRegressionCV(Cs=LOGISTIC_CS, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                             scoring="neg_log_loss", max_iter=2000, **kwargs)
  return make_pipeline(StandardScaler(), _TrainRowSpan(), clf)


def _auc(pos: np.ndarray, score: np.ndarray) -> float:
  return float(skm.roc_auc_score(pos, score)) if pos.any() and (~pos).any() else float("nan")


def _macro_ovr_auc(y: np.ndarray, proba: np.ndarray, classes: list) -> float:
  """Mean over the classes present in `y` (with negatives too) of one-vs-rest ROC-AUC."""
  aucs = [_auc(y == c, proba[:, j]) for j, c in enumerate(classes)]
  aucs = [a for a in aucs if np.isfinite(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def _fit_predict(task: str, x_tr, y_tr, x_te, classes: list, seed: int):
  """Fits the probe on the training rows -> (pred [m], proba [m, classes] | None)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    if task == "regression":
      return _regressor().fit(x_tr, y_tr).predict(x_te), None
    if len(set(y_tr.tolist())) < 2:
      return None, None
    model = _classifier(y_tr, seed).fit(x_tr, y_tr)
    proba = np.zeros((len(x_te), len(classes)))
    proba[:, [classes.index(c) for c in model.classes_]] = model.predict_proba(x_te)
    return model.predict(x_te), proba


def _score(task: str, y, pred, proba, classes: list) -> dict[str, float]:
  if pred is None or len(y) < 2:
    return {m: float("nan") for m in METRICS[task]}
  if task == "regression":
    with np.errstate(invalid="ignore", divide="ignore"):
      r = np.corrcoef(pred, y)[0, 1] if np.std(pred) > 0 else float("nan")
    return {"r2": float(skm.r2_score(y, pred)), "mae": float(skm.mean_absolute_error(y, pred)),
            "pearson_r": float(r)}
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
    return {"accuracy": float(skm.accuracy_score(y, pred)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
            "roc_auc": _macro_ovr_auc(y, proba, classes)}


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
  """(mean, low, high): 95% Student-t interval of the mean over the finite values."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(v.mean())
  if v.size < 2:
    return mean, float("nan"), float("nan")
  half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
  return mean, mean - half, mean + half


def _summary(values: Sequence[float], point: float | None = None) -> dict:
  mean, lo, hi = t_interval(values)
  if point is not None:  # the interval of `values`, centred on `point`
    lo, hi, mean = point - (mean - lo), point + (hi - mean), point
  return {"mean": mean, "ci95": [lo, hi], "folds": [float(v) for v in values]}


def _entry(name: str, x: np.ndarray, metrics: dict) -> dict:
  logging.info("probe %-12s %s", name, "  ".join(f"{m} {v['mean']:.3f}" for m, v in
                                                 metrics.items()))
  return {"name": name, "source": SOURCE.get(name, name), "dim": int(x.shape[1]),
          "metrics": metrics}


def _evaluate(features: Mapping[str, np.ndarray], y: np.ndarray, splits, task: str,
              classes: list, seed: int) -> list[dict]:
  """Every feature set on the same (train, test) splits; metrics over the folds."""
  out = []
  for name, x in features.items():
    folds = []
    for tr, te in splits:
      pred, proba = _fit_predict(task, x[tr], y[tr], x[te], classes, seed)
      folds.append(_score(task, y[te], pred, proba, classes))
    out.append(_entry(name, x, {m: _summary([f[m] for f in folds]) for m in METRICS[task]}))
  return out


def _subject_folds(y: np.ndarray, groups: np.ndarray, task: str, folds: int, seed: int):
  """Outer (train_idx, test_idx) splits, no subject on both sides."""
  if task == "classification":
    largest = max(len(set(groups[y == c].tolist())) for c in set(y.tolist()))
    if largest < folds:
      raise ValueError(f"every class has fewer subjects than folds={folds} (the largest has "
                       f"{largest}): lower --folds, or pass --task regression if the target is "
                       "a number")
    with warnings.catch_warnings():  # "the least populated class has only k members" is fine
      warnings.simplefilter("ignore", UserWarning)
      splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
      return list(splitter.split(np.zeros(len(y)), y, groups))
  subjects = np.unique(groups)
  np.random.default_rng(seed).shuffle(subjects)
  splits = []
  for chunk in np.array_split(subjects, folds):
    test = np.isin(groups, chunk)
    splits.append((np.flatnonzero(~test), np.flatnonzero(test)))
  return splits


def _chance(task: str, y: np.ndarray, classes: list) -> dict[str, float]:
  if task == "regression":
    return {"r2": 0.0, "pearson_r": 0.0, "mae": float(np.mean(np.abs(y - np.mean(y))))}
  counts = collections.Counter(y.tolist())
  return {"accuracy": max(counts.values()) / len(y), "balanced_accuracy": 1.0 / len(classes),
          "roc_auc": 0.5}


# Public names of the probe's label handling, split and metrics, shared with fine-tuning
# (finetune.py) so both evaluate the same way.
norm_subject = _norm_subject
as_float = _as_float
class_label = _class_label
sorted_classes = _sorted_classes
fit_predict = _fit_predict
score = _score
chance = _chance
subject_folds = _subject_folds


def _window_labels(feats: WindowFeatures, target: str, phenotypes) -> tuple[np.ndarray, str]:
  """Per-window label (None: no value) and where the labels came from."""
  if phenotypes is None:
    if target != "site":
      raise ValueError(f"target {target!r} needs a phenotype file (--phenotypes FILE with a "
                       f"{target!r} column); without one the built-in targets are "
                       f"{', '.join(BUILTIN_TARGETS)}")
    sites = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in feats.paths]
    labels = np.asarray([sites[i] for i in feats.recording], object)
    return labels, "parent folder of each recording"
  labels = np.asarray([phenotypes.get(_norm_subject(s)) for s in feats.subject], object)
  return labels, "phenotype file"


def run_probe(feats: WindowFeatures, target: str, *,
              phenotypes: str | Mapping[str, str] | None = None,
              subject_column: str = "participant_id", task: str = "auto", folds: int = 5,
              seed: int = 0) -> dict[str, Any]:
  """Probes every feature set of `feats` for `target`. Returns a JSON-able results dict.

  Args:
    target: 'subject-id', 'site', or a column of `phenotypes`.
    phenotypes: a CSV/TSV path, or an already read {subject: value} mapping.
    task: 'auto' | 'regression' | 'classification' (ignored for subject-id).
    folds: outer folds (split by subject) for phenotype/site targets.

  Raises:
    ValueError: missing column (the available ones are listed), constant target, fewer
      subjects than folds, non-numeric values for a regression, unknown task.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}; expected one of {TASKS}")
  # The probes are many small solves: BLAS threads only contend (measured ~6x slower with 2).
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    if target == "subject-id":
      return _fingerprint(feats, seed)
    return _subject_level(feats, target, phenotypes, subject_column, task, folds, seed)


def _subject_level(feats, target, phenotypes, subject_column, task, folds, seed):
  """Phenotype / site targets: one sample per subject, outer folds split by subject."""
  if isinstance(phenotypes, (str, os.PathLike)):
    phenotypes = read_phenotypes(os.fspath(phenotypes), subject_column, target)
  labels, origin = _window_labels(feats, target, phenotypes)
  have = np.asarray([v is not None for v in labels])
  n_missing = len({s for s, h in zip(feats.subject, have) if not h})
  if not have.any():
    raise ValueError(f"no recording's subject has a {target!r} value in the phenotype file "
                     f"(recording subjects e.g. {sorted(set(feats.subject))[:5]}; phenotype "
                     f"subjects e.g. {sorted(phenotypes)[:5]})")
  if n_missing:
    logging.warning("%d subject(s) have no %r value and are left out", n_missing, target)
  values = [str(v) for v in labels[have]]
  if target == "site" and task == "auto":
    task = "classification"
  elif task == "auto":
    task = infer_task(values, feats.subject[have].tolist())
    logging.info("target %r: %s (inferred from its values; --task chooses)", target, task)
  if task == "regression":
    bad = sorted({v for v in values if _as_float(v) is None})
    if bad:
      raise ValueError(f"target {target!r} has non-numeric values (e.g. {bad[:5]}); use "
                       "--task classification")
  win_y = np.asarray([_class_label(v) if task == "classification" else _as_float(v)
                      for v in values], object)

  # One sample per (subject, label): the mean of its window features.
  subjects = feats.subject[have]
  units = {}
  for i, key in enumerate(zip(subjects.tolist(), win_y.tolist())):
    units.setdefault(key, []).append(i)
  keys = list(units)
  groups = np.asarray([k[0] for k in keys])
  if task == "regression":
    y = np.asarray([k[1] for k in keys], np.float64)
  else:
    y = np.asarray([k[1] for k in keys])
  distinct = sorted(set(y.tolist()), key=str)
  if len(distinct) < 2:
    raise ValueError(f"target {target!r} is constant: all {len(set(groups))} subject(s) have "
                     f"the value {distinct[0]!r} ({origin}); nothing to predict")
  n_subjects = len(set(groups.tolist()))
  if folds < 2:
    raise ValueError(f"folds={folds}; need at least 2 outer folds")
  if n_subjects < folds:
    raise ValueError(f"only {n_subjects} subject(s) have a {target!r} value but folds={folds}: "
                     f"need at least as many subjects as folds ({n_subjects} subjects < "
                     f"{folds} folds); lower --folds or add subjects")
  classes = _sorted_classes(y.tolist()) if task == "classification" else []
  index = [np.asarray(units[k]) for k in keys]
  features = {name: np.stack([x[have][ix].mean(axis=0) for ix in index])
              for name, x in feats.features.items()}
  splits = _subject_folds(y, groups, task, folds, seed)
  results = {
      "target": target, "task": task, "main_metric": MAIN_METRIC[task],
      "scheme": f"{folds}-fold cross-validation split by subject; window features averaged "
                "per subject",
      "labels_from": origin, "n_subjects": n_subjects, "n_samples": len(y),
      "n_windows": int(have.sum()), "n_subjects_without_value": n_missing, "n_folds": folds,
      "ci_over": "folds",
      "classes": classes, "chance": _chance(task, y, classes),
      "feature_sets": _evaluate(features, y, splits, task, classes, seed),
  }
  if task == "classification":
    results["class_counts"] = dict(collections.Counter(y.tolist()))
  return results


def _fingerprint(feats: WindowFeatures, seed: int) -> dict[str, Any]:
  """Subject identification: first half of each recording's windows vs its second half."""
  n_win = np.zeros(len(feats.paths), np.int64)
  np.maximum.at(n_win, feats.recording, feats.window + 1)
  per = n_win[feats.recording]
  half = per // 2
  first = (feats.window < half)
  second = (feats.window >= per - half) & (half > 0)
  short = int(np.sum((n_win > 0) & (n_win < 2)))
  if short:
    logging.warning("subject-id: %d recording(s) have a single window and are left out", short)
  y = feats.subject.astype(str)
  subjects = sorted(set(y[first | second].tolist()))
  if len(subjects) < 2:
    raise ValueError(f"subject-id needs at least 2 subjects with recordings of >= 2 windows; "
                     f"have {len(subjects)}")
  a, b = np.flatnonzero(first), np.flatnonzero(second)
  keep = np.concatenate([a, b])
  classes = subjects
  sets = []
  for name, x in feats.features.items():
    pred = np.empty(len(y), object)
    auc = np.full((2, len(classes)), np.nan)  # per direction, per subject (one-vs-rest)
    folds = []
    for d, (tr, te) in enumerate(((a, b), (b, a))):
      p, proba = _fit_predict("classification", x[tr], y[tr], x[te], classes, seed)
      pred[te] = p
      folds.append(_score("classification", y[te], p, proba, classes))
      auc[d] = [_auc(y[te] == c, proba[:, j]) for j, c in enumerate(classes)]
    recall = [float(np.mean(pred[keep][y[keep] == c] == c)) for c in classes]
    subject_auc = np.nanmean(auc, axis=0)
    metrics = {
        "accuracy": _summary(recall, point=float(np.mean(pred[keep] == y[keep]))),
        "balanced_accuracy": _summary(recall),
        "roc_auc": _summary(subject_auc.tolist()),
    }
    for m in metrics:  # per-direction values, for reference
      metrics[m]["per_direction"] = [f[m] for f in folds]
      metrics[m]["per_subject"] = metrics[m].pop("folds")
    sets.append(_entry(name, x, metrics))
  return {
      "target": "subject-id", "task": "classification", "main_metric": MAIN_METRIC["subject-id"],
      "scheme": "fingerprinting: train on the first half of each recording's windows, test on "
                "the second half, and the reverse; metrics on the pooled test predictions, 95% "
                "t-interval over subjects (each subject's identification rate / one-vs-rest AUC)",
      "labels_from": "subject of each recording", "n_subjects": len(subjects),
      "n_samples": int(len(keep)), "n_windows": int(len(keep)),
      "n_recordings_left_out": short, "n_folds": 2, "ci_over": "subjects", "classes": subjects,
      "chance": {"accuracy": 1.0 / len(subjects), "balanced_accuracy": 1.0 / len(subjects),
                 "roc_auc": 0.5},
      "feature_sets": sets,
  }


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(m: dict) -> str:
  mean, (lo, hi) = m["mean"], m["ci95"]
  if mean is None or not np.isfinite(mean):
    return "n/a"
  if lo is None or not np.isfinite(lo):
    return f"{mean:.3f}"
  return f"{mean:.3f} ± {(hi - lo) / 2:.3f}"


def format_table(results: dict) -> str:
  """Markdown table: one row per feature set, best mean per metric in bold, chance last."""
  metrics = list(results["feature_sets"][0]["metrics"]) if results["feature_sets"] else []
  best = {}
  for m in metrics:
    means = [(fs["metrics"][m]["mean"], i) for i, fs in enumerate(results["feature_sets"])
             if fs["metrics"][m]["mean"] is not None and np.isfinite(fs["metrics"][m]["mean"])]
    if means:
      best[m] = (min if m in LOWER_IS_BETTER else max)(means)[0]
  lines = ["| features | source | dim | " + " | ".join(
      m + (" ↓" if m in LOWER_IS_BETTER else "") for m in metrics) + " |",
           "|---|---|---:|" + "---:|" * len(metrics)]
  for fs in results["feature_sets"]:
    cells = []
    for m in metrics:
      s = _fmt(fs["metrics"][m])
      if m in best and fs["metrics"][m]["mean"] == best[m]:
        s = f"**{s}**"
      cells.append(s)
    lines.append(f"| {fs['name']} | {fs['source']} | {fs['dim']} | " + " | ".join(cells) + " |")
  chance = results.get("chance", {})
  lines.append("| *chance* | | | " + " | ".join(
      f"*{chance[m]:.3f}*" if m in chance else "" for m in metrics) + " |")
  return "\n".join(lines)


def _ci_units(results: dict) -> str:
  if results.get("ci_over") == "subjects":
    return f"{results['n_subjects']} subjects"
  return f"{results['n_folds']} folds"


def _markdown(results: dict) -> str:
  head = [f"# Linear probe: `{results['target']}` ({results['task']})", ""]
  ck = results.get("checkpoint")
  if ck:
    head.append(f"- checkpoint: `{ck['path']}` (step {ck['step']})")
  if results.get("data"):
    head.append(f"- data: `{results['data']}`")
  head += [f"- {results['n_subjects']} subjects, {results['n_samples']} samples "
           f"({results['n_windows']} windows); labels from {results['labels_from']}",
           f"- scheme: {results['scheme']}",
           f"- main metric: {results['main_metric']}; values are mean ± 95% t-interval "
           f"half-width over {_ci_units(results)}; best per metric in bold",
           "- probes: StandardScaler + RidgeCV / LogisticRegressionCV (inner CV)"]
  overlap = results.get("pretraining_overlap")
  if overlap:
    head.append(f"- subjects also in pretraining: {overlap['train']} train, "
                f"{overlap['validation']} validation (of {overlap['probe_subjects']})")
  return "\n".join(head) + "\n\n" + format_table(results) + "\n"


def _num(x) -> float:
  return float("nan") if x is None else float(x)


def _plot(results: dict, path: str) -> None:
  # The Agg canvas directly: no pyplot, no global backend switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=C0415
  from matplotlib.figure import Figure  # pylint: disable=C0415
  m = results["main_metric"]
  sets = results["feature_sets"]
  colors = {"model": "#1f77b4", "random-init": "#9a9a9a", "fc": "#ff7f0e"}
  means = np.asarray([_num(fs["metrics"][m]["mean"]) for fs in sets])
  lo = np.asarray([_num(fs["metrics"][m]["ci95"][0]) for fs in sets])
  hi = np.asarray([_num(fs["metrics"][m]["ci95"][1]) for fs in sets])
  err = np.nan_to_num(np.stack([means - lo, hi - means]), nan=0.0)  # [2, sets]: no CI -> no bar
  fig = Figure(figsize=(1.3 * len(sets) + 2.5, 4.0))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(sets))
  ax.bar(x, np.nan_to_num(means), yerr=err, capsize=5,
         color=[colors.get(fs["source"], "#2ca02c") for fs in sets], edgecolor="black",
         linewidth=0.6)
  for xi, v, top in zip(x, means, np.where(np.isfinite(hi), np.fmax(hi, means), means)):
    if np.isfinite(v):  # above the upper whisker, clear of the error bar
      ax.annotate(f"{v:.2f}", (xi, top), textcoords="offset points", xytext=(0, 3),
                  ha="center", va="bottom", fontsize=8)
  chance = results.get("chance", {}).get(m)
  if chance is not None:
    ax.axhline(chance, color="red", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.legend(loc="best", fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels([fs["name"] if fs["name"] == fs["source"] else
                      f"{fs['name']}\n({fs['source']})" for fs in sets], fontsize=8)
  ax.set_ylabel(f"{m} (mean, 95% CI over {_ci_units(results)})")
  ax.set_title(f"Linear probe: {results['target']} ({results['task']}, "
               f"{results['n_subjects']} subjects)", fontsize=10)
  if m in ("accuracy", "balanced_accuracy", "roc_auc"):
    ax.set_ylim(0, 1.12)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  return x


def write_report(results: dict, out_dir: str) -> dict[str, str]:
  """Writes probe.json (all metrics, per fold too), probe.md (table) and probe.png (main metric
  per feature set with 95% CI bars). Returns {'json', 'md', 'png'} paths."""
  os.makedirs(out_dir, exist_ok=True)
  results = _jsonable(results)
  paths = {k: os.path.join(out_dir, f"probe.{k}") for k in ("json", "md", "png")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
    f.write("\n")
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(_markdown(results))
  _plot(results, paths["png"])
  return paths


# ----------------------------------------------------------------------------------------------
# The whole job.


def probe_checkpoint(checkpoint: str, *, target: str, out_dir: str, data: str | None = None,
                     phenotypes: str | None = None, subject_column: str = "participant_id",
                     task: str = "auto", folds: int = 5, batch_size: int = 32, seed: int = 0,
                     step: int | None = None, fisher_z: bool = True) -> dict[str, Any]:
  """load_pretrained -> load recordings -> extract_features -> run_probe -> write_report.

  `data` defaults to the pretraining run's config.data.path. Phenotype columns are checked before
  any window is encoded. Returns the results (with 'report' paths).
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}; expected one of {TASKS}")
  table = None
  if phenotypes and target != "subject-id":
    table = read_phenotypes(phenotypes, subject_column, target)
  elif target not in BUILTIN_TARGETS:
    raise ValueError(f"target {target!r} needs --phenotypes FILE with a {target!r} column; "
                     f"without one the built-in targets are {', '.join(BUILTIN_TARGETS)}")
  pre = restore.load_pretrained(checkpoint, step=step)
  data_cfg = pre.config.get("data", {})
  data = data or data_cfg.get("path")
  if not data:
    raise ValueError(f"no --data given and the checkpoint {pre.path} stores no data.path")
  if isinstance(data, str) and not os.path.exists(data) and not any(c in data for c in "*?["):
    raise FileNotFoundError(f"{data}: data not found (from "
                            f"{'--data' if data != data_cfg.get('path') else 'the checkpoint'}"
                            "'s data.path; pass --data DIR)")
  recs, skipped = recordings_lib.load_recordings(
      data, window=pre.model_cfg.window, num_parcels=pre.model_cfg.num_parcels,
      subject_pattern=data_cfg.get("subject_pattern") or recordings_lib.DEFAULT_SUBJECT_PATTERN)
  logging.info("Probing %s (step %d) on %d recordings of %d subjects (%d skipped)", pre.path,
               pre.step, len(recs), len({r.subject for r in recs}), len(skipped))
  feats = extract_features(pre, recs, batch_size=batch_size, seed=seed, fisher_z=fisher_z)
  results = run_probe(feats, target, phenotypes=table, subject_column=subject_column, task=task,
                      folds=folds, seed=seed)
  probe_subjects = set(feats.subject.tolist())
  results.update(
      checkpoint={"path": pre.path, "step": pre.step}, data=str(data),
      n_recordings=len(recs), skipped_recordings=skipped,
      pretraining_overlap={
          "probe_subjects": len(probe_subjects),
          "train": len(probe_subjects & set(pre.subjects.get("train", []))),
          "validation": len(probe_subjects & set(pre.subjects.get("validation", [])))},
      options={"seed": seed, "folds": folds, "batch_size": batch_size, "fisher_z": fisher_z,
               "subject_column": subject_column, "phenotypes": phenotypes})
  results["report"] = write_report(results, out_dir)
  return results
