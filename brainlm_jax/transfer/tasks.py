"""Fine-tuning tasks: labels and the train / test split of the recordings for a target.

  task = prepare_task(config, pre, recordings) -> TaskData
  subject_outputs(task, outputs, recording)   window outputs -> per-subject probabilities/values
  score_predictions(task, outputs, recording) -> metrics (and the window loss)

  subject-id   classification [B, subjects]: windows from the first part of each recording train,
               non-overlapping windows of the last part test (as the probe's fingerprinting).
  forecast     the last k patches of every parcel predicted from the rest; held-out subjects.
  a column     of a phenotype CSV/TSV: regression (standardised targets) or classification; one
               stratified subject fold is held out; predictions are averaged per subject.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

from brainlm_jax.data import datasets
from brainlm_jax.data import phenotypes as phenotypes_lib
from brainlm_jax.data.phenotypes import norm_subject
from brainlm_jax.data.readers import Recording
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.transfer import labels as labels_lib
from brainlm_jax.transfer.run import Pretrained

BUILTIN_TARGETS = ("subject-id", "forecast")


@dataclasses.dataclass
class TaskData:
  """kind: classification | regression | forecast. train/test: recordings (for subject-id, the
  first / last part of each one). *_labels: per recording, int class index or float target (None
  for forecast). classes: class names. y_mean/y_std standardise regression targets. unit: what the
  test metrics average over ('window' or 'subject')."""
  target: str
  kind: str
  train: list
  test: list
  train_labels: np.ndarray | None = None
  test_labels: np.ndarray | None = None
  classes: list = dataclasses.field(default_factory=list)
  y_mean: float = 0.0
  y_std: float = 1.0
  unit: str = "window"
  scheme: str = ""

  @property
  def num_outputs(self) -> int:
    return len(self.classes) if self.kind == "classification" else 1

  def describe(self) -> dict:
    return {"target": self.target, "kind": self.kind, "classes": self.classes, "unit": self.unit,
            "y_mean": self.y_mean, "y_std": self.y_std, "scheme": self.scheme,
            "train_subjects": sorted({r.subject for r in self.train}),
            "test_subjects": sorted({r.subject for r in self.test}),
            "train_recordings": [r.path for r in self.train],
            "test_recordings": [r.path for r in self.test]}


def _segment(r: Recording, start: int, stop: int) -> Recording:
  return dataclasses.replace(r, signal=r.signal[start:stop])


def _subject_id_task(recs: Sequence[Recording], window: int, train_fraction: float) -> TaskData:
  if not 0 < train_fraction < 1:
    raise ValueError(f"data.train_fraction={train_fraction} must be in (0, 1)")
  train, test = [], []
  for r in recs:
    cut = int(round(r.num_timepoints * train_fraction))
    if cut < window or r.num_timepoints - cut < window:
      logging.warning("subject-id: %s (%d timepoints) cannot give a window of %d to both sides of "
                      "a %.2f split; left out", r.path, r.num_timepoints, window, train_fraction)
      continue
    train.append(_segment(r, 0, cut))
    test.append(_segment(r, cut, r.num_timepoints))
  classes = sorted({r.subject for r in train})
  if len(classes) < 2:
    need = int(np.ceil(window / min(train_fraction, 1 - train_fraction)))
    raise ValueError(f"{labels_lib.too_few_subjects([r.subject for r in train])} Only "
                     f"recordings of >= {need} timepoints count (a window of {window} on both "
                     f"sides of data.train_fraction={train_fraction}).")
  labels = np.asarray([classes.index(r.subject) for r in train], np.int64)
  return TaskData("subject-id", "classification", train, test, labels, labels.copy(), classes,
                  unit="window",
                  scheme=f"every subject on both sides: random windows of the first "
                         f"{train_fraction:.0%} of each recording train, non-overlapping windows "
                         "of the rest test")


def _phenotype_task(recs: Sequence[Recording], target: str, d: Any, kind: str,
                    seed: int) -> TaskData:
  if not d.phenotypes:
    raise ValueError(f"task.target={target!r} needs --config.data.phenotypes=FILE with a "
                     f"{target!r} column; the built-in targets are {', '.join(BUILTIN_TARGETS)}")
  table = phenotypes_lib.read_phenotypes(d.phenotypes, d.subject_column, target)
  values = [table.get(norm_subject(r.subject)) for r in recs]
  have = [r for r, v in zip(recs, values) if v is not None]
  values = [v for v in values if v is not None]
  if not have:
    raise ValueError(f"{d.phenotypes}: no recording's subject has a {target!r} value (recording "
                     f"subjects e.g. {sorted({r.subject for r in recs})[:5]}; phenotype subjects "
                     f"e.g. {sorted(table)[:5]})")
  if len(have) < len(recs):
    logging.warning("%d recording(s) have no %r value and are left out", len(recs) - len(have),
                    target)
  kind, labels = labels_lib.target_values(target, values, [r.subject for r in have], kind,
                                         option="--config.task.type", where=f"{d.phenotypes}: ")
  per_subject = dict(zip((r.subject for r in have), labels.tolist()))
  subjects = np.asarray(sorted(per_subject))
  y = np.asarray([per_subject[s] for s in subjects], labels.dtype)
  if len(set(y.tolist())) < 2:
    raise ValueError(f"{d.phenotypes}: target {target!r} is constant: all {len(subjects)} "
                     f"subject(s) have the value {y[0]!r}; nothing to predict")
  if d.folds < 2 or len(subjects) < d.folds:
    raise ValueError(f"{d.phenotypes}: only {len(subjects)} subject(s) have a {target!r} value "
                     f"but data.folds={d.folds}: need at least 2 folds and as many subjects as "
                     f"folds; lower --config.data.folds or add subjects")
  try:
    _, test_idx = labels_lib.subject_folds(y, subjects, kind, d.folds, seed)[0]
  except ValueError as e:  # e.g. a class with fewer subjects than folds
    raise ValueError(f"{d.phenotypes}: cannot split the {len(subjects)} subjects with a {target!r}"
                     f" value into data.folds={d.folds} stratified subject folds ({e}); lower "
                     "--config.data.folds, or use --config.task.type=regression for a numeric "
                     "target") from e
  test_subjects = set(subjects[test_idx].tolist())
  train = [r for r in have if r.subject not in test_subjects]
  test = [r for r in have if r.subject in test_subjects]
  task = TaskData(target, kind, train, test, unit="subject",
                  scheme=f"held-out subjects: 1 of {d.folds} subject folds "
                         f"({len(test_subjects)} of {len(subjects)} subjects) tests; window "
                         "predictions averaged per subject")
  y_of = lambda rs: np.asarray([per_subject[r.subject] for r in rs], labels.dtype)  # noqa: E731
  if kind == "classification":
    task.classes = labels_lib.sorted_classes(y.tolist())
    missing = sorted(set(task.classes) - set(y_of(train).tolist()))
    if missing:
      logging.warning("classes %s have no training subject", missing)
    task.train_labels = np.asarray([task.classes.index(v) for v in y_of(train)], np.int64)
    task.test_labels = np.asarray([task.classes.index(v) for v in y_of(test)], np.int64)
  else:
    ytr = y_of(train)
    task.y_mean, task.y_std = float(ytr.mean()), float(ytr.std() or 1.0)
    task.train_labels, task.test_labels = ytr, y_of(test)
  return task


def prepare_task(config: ml_collections.ConfigDict, pre: Pretrained,
                 recs: Sequence[Recording]) -> TaskData:
  """Labels and the train/test split of `recs` for config.task.target."""
  t, d = config.task, config.data
  window = pre.model_cfg.window
  if t.target == "subject-id":
    return _subject_id_task(recs, window, d.train_fraction)
  if t.target == "forecast":
    if pre.model_cfg.variant == "vitmae_image":
      raise ValueError(f"{pre.path}: task.target=forecast needs a parcels x time-patches model; "
                       "this vitmae_image checkpoint patches the recording as an image")
    masking_lib.num_visible("forecast", 1, pre.model_cfg.num_patches, 0.0, t.forecast_patches)
    train, test = datasets.split_by_subject(recs, val_fraction=d.val_fraction,
                                           seed=config.seed)
    if not test:
      raise ValueError(f"data.val_fraction={d.val_fraction}: forecasting needs held-out subjects")
    return TaskData("forecast", "forecast", train, test, unit="window",
                    scheme=f"held-out subjects ({len({r.subject for r in test})} of "
                           f"{len({r.subject for r in recs})}, data.val_fraction={d.val_fraction},"
                           f" seed {config.seed}); non-overlapping test windows")
  if t.type not in labels_lib.TASKS:
    raise ValueError(f"task.type={t.type!r}; expected one of {labels_lib.TASKS}")
  return _phenotype_task(recs, t.target, d, t.type, config.seed)


# ----------------------------------------------------------------------------------------------
# Scores of a task's test side.


def subject_outputs(task: TaskData, out: np.ndarray, recording: np.ndarray
                    ) -> tuple[list, np.ndarray, np.ndarray]:
  """Window outputs [n, C] (logits or standardised predictions) of task.test (`recording` [n]
  indexes them) -> (units, labels [u], values [u, C]): class probabilities or predictions in
  the target's units, averaged per subject when task.unit is 'subject' (units: the subjects,
  sorted), else per window (units: window indices)."""
  if task.kind == "classification":
    values = np.exp(out - out.max(axis=1, keepdims=True))
    values /= values.sum(axis=1, keepdims=True)
  else:
    values = out[:, :1] * task.y_std + task.y_mean
  y = task.test_labels[recording]
  if task.unit != "subject":
    return list(range(len(y))), y, values
  subjects = np.asarray([task.test[i].subject for i in recording])
  units = sorted(set(subjects.tolist()))
  values = np.stack([values[subjects == s].mean(axis=0) for s in units])
  y = np.asarray([y[subjects == s][0] for s in units])
  return units, y, values


def window_loss(task: TaskData, out: np.ndarray, recording: np.ndarray) -> float:
  """The training loss per test window: cross-entropy, or the MSE of standardised targets."""
  y = task.test_labels[recording]
  if task.kind == "classification":
    z = out - out.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())
  return float(np.mean((out[:, 0] - (y - task.y_mean) / task.y_std) ** 2))


def score_predictions(task: TaskData, out: np.ndarray, recording: np.ndarray) -> dict:
  """Window outputs [n, C] (logits or standardised predictions) of test recordings -> metrics,
  per window or averaged per subject (task.unit), and the window `loss`."""
  _, y, values = subject_outputs(task, out, recording)
  if task.kind == "classification":
    names = np.asarray(task.classes, object)
    m = labels_lib.score("classification", names[y], names[values.argmax(axis=1)], values,
                     list(task.classes))
  else:
    m = labels_lib.score("regression", y.astype(np.float64), values[:, 0], None, [])
  m["loss"] = window_loss(task, out, recording)
  return {k: float(v) for k, v in m.items()}
