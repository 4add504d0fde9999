"""Targets, folds and scores shared by every transfer job (probe, fine-tuning).

  infer_task(values, subjects) -> 'classification' | 'regression'
  class_label(v) / sorted_classes(labels)         class names as a person reads them ('1', 'F')
  subject_folds(y, groups, task, folds, seed)     outer splits that never share a subject
  score(task, y, pred, proba, classes)            accuracy / balanced accuracy / ROC-AUC, or
                                                  R² / MAE / Pearson r
  chance(task, y, classes)                        majority / uniform / predict-the-mean
  summary(values) -> {'mean', 'ci95', 'folds'}    95% Student-t interval over folds or units
  too_few_subjects(subjects, need, what) -> str   the error when a job has too few subjects
"""

from __future__ import annotations

import collections
import math
import warnings
from typing import Iterable, Mapping, Sequence

from absl import logging
import numpy as np
from scipy import stats
from sklearn.model_selection import StratifiedGroupKFold

from brainlm_jax.data.phenotypes import as_float

TASKS = ("auto", "regression", "classification")
METRICS = {"regression": ("r2", "mae", "pearson_r"),
           "classification": ("accuracy", "balanced_accuracy", "roc_auc")}
LOWER_IS_BETTER = frozenset({"mae", "mse"})
MAX_CLASSES_FOR_AUTO = 10  # <= this many distinct integer values: classification


def infer_task(values: Sequence[str], subjects: Sequence[str] | None = None) -> str:
  """'classification' for non-numeric values, or integers with <= 10 distinct values that
  repeat (at most half as many distinct values as subjects: a diagnosis coded 0/1/2, not the
  ages of a small cohort); else 'regression'. With `subjects` (one per value: windows or
  recordings repeat their subject's value), each subject counts once."""
  if subjects is not None:
    values = list(dict(zip(subjects, values)).values())
  nums = [as_float(v) for v in values]
  if any(v is None for v in nums):
    return "classification"
  distinct = set(nums)
  if (all(float(v).is_integer() for v in distinct) and len(distinct) <= MAX_CLASSES_FOR_AUTO
      and 2 * len(distinct) <= len(nums)):
    return "classification"
  return "regression"


def target_values(target: str, values: Sequence[str], subjects: Sequence[str], task: str, *,
                  option: str, where: str = "") -> tuple[str, np.ndarray]:
  """(task, labels) of a target's string `values` (one per sample, `subjects` beside them): an
  'auto' task is inferred (infer_task) and logged, naming the `option` that chooses it; labels
  are floats [N] for regression (a non-numeric value is a ValueError naming `where` and `option`),
  class names (object [N]) for classification."""
  if task == "auto":
    task = infer_task(values, subjects)
    logging.info("target %r: %s (inferred from its values; %s chooses)", target, task, option)
  if task == "regression":
    bad = sorted({v for v in values if as_float(v) is None})
    if bad:
      raise ValueError(f"{where}target {target!r} has non-numeric values (e.g. {bad[:5]}); use "
                       f"{option}=classification")
    return task, np.asarray([as_float(v) for v in values], np.float64)
  return task, np.asarray([class_label(v) for v in values], object)


def too_few_subjects(subjects: Iterable[str] | Mapping[str, int], need: int = 2,
                     what: str = "subject-id") -> str:
  """The error message of a job that needs `need` subjects and has fewer: it names the ids found
  and how many recordings each covers, where subject ids come from and the flag that sets them.

  Args:
    subjects: the subject of each recording (an id that repeats covers several), or
      {subject: number of recordings}.
    need: the least number of subjects the job needs.
    what: the job or target, first in the message.
  """
  counts = (dict(subjects) if isinstance(subjects, Mapping)
            else collections.Counter(str(s) for s in subjects))
  shown = ", ".join(f"{s!r} ({n} recording{'' if n == 1 else 's'})"
                    for s, n in sorted(counts.items())[:5])
  more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
  found = f": {shown}{more}" if counts else ""
  return (f"{what} needs at least {need} subjects; have {len(counts)}{found}. Subject ids come "
          "from the recordings' file names through the subject pattern (its first group is the "
          "id), or from the subject column of a cohort table beside the recordings; if files of "
          "several subjects share one id, set --subject-pattern REGEX, e.g. "
          "'^([^_]+_[^_]+)' (NAP_001_rest.mat -> NAP_001).")


def class_label(v: str) -> str:
  """A class's name: integers without their '.0', other values stripped."""
  f = as_float(v)
  return str(int(f)) if f is not None and f.is_integer() else str(v).strip()


def sorted_classes(labels) -> list[str]:
  """Distinct labels, in numeric order when they are all numbers."""
  labels = sorted(set(labels))
  nums = [as_float(v) for v in labels]
  if all(v is not None for v in nums):
    return [l for _, l in sorted(zip(nums, labels))]
  return labels


def subject_folds(y: np.ndarray, groups: np.ndarray, task: str, folds: int, seed: int):
  """Outer (train_idx, test_idx) splits, no subject (group) on both sides: stratified by class
  for classification, subjects shuffled into `folds` chunks for regression."""
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


def chance(task: str, y: np.ndarray, classes: list) -> dict[str, float]:
  """What a model without features scores: the majority class / uniform guessing, or the mean."""
  if task == "regression":
    return {"r2": 0.0, "pearson_r": 0.0, "mae": float(np.mean(np.abs(y - np.mean(y))))}
  counts = collections.Counter(y.tolist())
  return {"accuracy": max(counts.values()) / len(y), "balanced_accuracy": 1.0 / len(classes),
          "roc_auc": 0.5}


def auc(pos: np.ndarray, score_: np.ndarray) -> float:
  """ROC-AUC of `score_` for the boolean `pos` (Mann-Whitney U over average ranks: equal to
  sklearn's roc_auc_score, ~50x cheaper, which the 1,000 bootstrap resamples of every probe
  row need); NaN without both positives and negatives."""
  pos = np.asarray(pos, bool)
  n_pos = int(pos.sum())
  n_neg = len(pos) - n_pos
  if not n_pos or not n_neg:
    return float("nan")
  ranks = stats.rankdata(score_)
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro_ovr_auc(y: np.ndarray, proba: np.ndarray, classes: list) -> float:
  """Mean over the classes present in `y` (with negatives too) of one-vs-rest ROC-AUC."""
  aucs = [auc(y == c, proba[:, j]) for j, c in enumerate(classes)]
  aucs = [a for a in aucs if np.isfinite(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def score(task: str, y, pred, proba, classes: list) -> dict[str, float]:
  """METRICS[task] of predictions `pred` (and class probabilities `proba` [n, classes]).
  Balanced accuracy averages the recall of the classes present in `y`; R² of a constant `y`
  is 1 for a perfect prediction, else 0 (sklearn's conventions; tests/test_labels.py checks
  every metric against sklearn.metrics)."""
  if pred is None or len(y) < 2:
    return {m: float("nan") for m in METRICS[task]}
  y, pred = np.asarray(y), np.asarray(pred)
  if task == "regression":
    y, pred = y.astype(np.float64), pred.astype(np.float64)
    ss_res, ss_tot = np.sum((y - pred) ** 2), np.sum((y - y.mean()) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
      r = np.corrcoef(pred, y)[0, 1] if np.std(pred) > 0 else float("nan")
    return {"r2": float(1 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)),
            "mae": float(np.mean(np.abs(y - pred))), "pearson_r": float(r)}
  right = (pred == y).astype(np.float64)
  _, cls = np.unique(y.astype(str), return_inverse=True)
  recall = np.bincount(cls, weights=right) / np.bincount(cls)
  return {"accuracy": float(right.mean()), "balanced_accuracy": float(recall.mean()),
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


def summary(values: Sequence[float], point: float | None = None) -> dict:
  """{'mean', 'ci95': [low, high], 'folds': values}: the t-interval of `values`, centred on
  `point` when given (e.g. a pooled accuracy with the spread of per-subject rates)."""
  mean, lo, hi = t_interval(values)
  if point is not None:
    lo, hi, mean = point - (mean - lo), point + (hi - mean), point
  return {"mean": mean, "ci95": [lo, hi], "folds": [float(v) for v in values]}


def point(value: float) -> dict:
  """A single score in `summary`'s format (no interval)."""
  return {"mean": float(value), "ci95": [float("nan"), float("nan")]}
