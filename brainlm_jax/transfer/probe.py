"""Linear probing: how much of a target is linearly readable from pretrained embeddings?

Every feature set of `features.extract_features` (the model's CLS / mean tokens, a random-init
encoder's, functional connectivity), from the same windows, in the same run and table.

Targets:
  a phenotype column        (a CSV/TSV with a subject column): one row per subject, window
                            features averaged per subject; regression or classification.
  subject-id                fingerprinting: windows from the first half of each recording train
                            a multi-class classifier, the second half tests it, and vice versa;
                            metrics on the pooled test windows, CI over subjects (2 folds give
                            no useful t-interval). A recording that fits one window but is
                            longer gets two overlapping ones, its first and its last timepoints
                            (counted in the report).
  site                      a phenotype column, or without a phenotype file the parent folder
                            of each recording; classification.
Probes: `linear.fit_predict` (penalty by inner CV on the training rows); outer folds split by
subject, the same for every feature set. Metrics are mean and 95% t-interval over the outer
folds (over subjects for subject-id).

  feats = features.extract_features(pre, recordings)
  results = run_probe(feats, "age", phenotypes="participants.tsv")
  results = Probe("age", phenotypes="participants.tsv").run(pre, "out/")  # + probe.json/.md/.png

The report (probe.json, probe.md, probe.png) is `probe_report`'s.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
import threadpoolctl

from brainlm_jax.data import cohort as cohort_lib
from brainlm_jax.data import phenotypes as phenotypes_lib
from brainlm_jax.data.phenotypes import norm_subject
from brainlm_jax.transfer import clinical
from brainlm_jax.transfer import identify
from brainlm_jax.transfer import labels
from brainlm_jax.transfer import linear
from brainlm_jax.transfer.probe_report import format_table, write_report
from brainlm_jax.transfer import features as features_lib
from brainlm_jax.transfer.features import WindowFeatures, extract_features, source_of
from brainlm_jax.transfer.run import Evaluator, Pretrained, load_pretrained

BUILTIN_TARGETS = ("subject-id", "site")
MAIN_METRIC = {"regression": "r2", "classification": "balanced_accuracy",
               "subject-id": "accuracy"}


def _entry(name: str, dim: int, metrics: dict) -> dict:
  logging.info("probe %-12s %s", name, "  ".join(f"{m} {v['mean']:.3f}" for m, v in
                                                 metrics.items()))
  return {"name": name, "source": source_of(name), "dim": int(dim), "metrics": metrics}


def _evaluate(feats: WindowFeatures, units: list[np.ndarray], y: np.ndarray, splits, task: str,
              classes: list, seed: int) -> list[dict]:
  """Every row on the same (train, test) splits of `units` (each a sample: the mean of its
  windows' features; a fitted reading's statistics from the training units' windows only);
  metrics over the folds."""
  out = []
  for name in feats.names:
    fixed = (clinical.subject_means(feats.features[name], units) if feats.fixed(name)
             else None)
    make = (None if fixed is not None else clinical.fitted_subject_row(feats, name, units))
    folds = []
    for tr, te in splits:
      x_tr, x_te = (fixed[tr], fixed[te]) if fixed is not None else make(tr, te)
      pred, proba = linear.fit_predict(task, x_tr, y[tr], x_te, classes, seed)
      folds.append(labels.score(task, y[te], pred, proba, classes))
    out.append(_entry(name, feats.dim(name), {m: labels.summary([f[m] for f in folds])
                                              for m in labels.METRICS[task]}))
  return out


def _window_labels(feats: WindowFeatures, target: str, phenotypes) -> tuple[np.ndarray, str]:
  """Per-window label (None: no value) and where the labels came from."""
  if phenotypes is None:
    if target != "site":
      raise ValueError(f"target {target!r} needs a phenotype file (--phenotypes FILE with a "
                       f"{target!r} column); without one the built-in targets are "
                       f"{', '.join(BUILTIN_TARGETS)}")
    sites = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in feats.paths]
    out = np.asarray([sites[i] for i in feats.recording], object)
    return out, "parent folder of each recording"
  out = np.asarray([phenotypes.get(norm_subject(s)) for s in feats.subject], object)
  return out, "phenotype file"


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
  if task not in labels.TASKS:
    raise ValueError(f"task={task!r}; expected one of {labels.TASKS}")
  # The probes are many small solves: BLAS threads only contend (measured ~6x slower with 2).
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    if target == "subject-id":
      return _fingerprint(feats, seed)
    return _subject_level(feats, target, phenotypes, subject_column, task, folds, seed)


def _subject_level(feats, target, phenotypes, subject_column, task, folds, seed):
  """Phenotype / site targets: one sample per subject, outer folds split by subject."""
  if isinstance(phenotypes, (str, os.PathLike)):
    phenotypes = phenotypes_lib.read_phenotypes(os.fspath(phenotypes), subject_column, target)
  window_labels, origin = _window_labels(feats, target, phenotypes)
  have = np.asarray([v is not None for v in window_labels])
  n_missing = len({s for s, h in zip(feats.subject, have) if not h})
  if not have.any():
    raise ValueError(f"no recording's subject has a {target!r} value in the phenotype file "
                     f"(recording subjects e.g. {sorted(set(feats.subject))[:5]}; phenotype "
                     f"subjects e.g. {sorted(phenotypes)[:5]})")
  if n_missing:
    logging.warning("%d subject(s) have no %r value and are left out", n_missing, target)
  values = [str(v) for v in window_labels[have]]
  if target == "site" and task == "auto":
    task = "classification"
  task, win_y = labels.target_values(target, values, feats.subject[have].tolist(), task,
                                     option="--task")

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
  classes = labels.sorted_classes(y.tolist()) if task == "classification" else []
  windows = np.flatnonzero(have)
  index = [windows[np.asarray(units[k])] for k in keys]
  splits = labels.subject_folds(y, groups, task, folds, seed)
  results = {
      "target": target, "task": task, "main_metric": MAIN_METRIC[task],
      "scheme": f"{folds}-fold cross-validation split by subject; window features averaged "
                "per subject",
      "labels_from": origin, "n_subjects": n_subjects, "n_samples": len(y),
      "n_windows": int(have.sum()), "n_subjects_without_value": n_missing, "n_folds": folds,
      "ci_over": "folds",
      "classes": classes, "chance": labels.chance(task, y, classes),
      "feature_sets": _evaluate(feats, index, y, splits, task, classes, seed),
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
    firsts = np.unique(feats.recording, return_index=True)[1]
    firsts = firsts[n_win[feats.recording[firsts]] >= 2]
    raise ValueError(labels.too_few_subjects(
        y[firsts].tolist(), what="subject-id (subjects with recordings of >= 2 windows)"))
  a, b = np.flatnonzero(first), np.flatnonzero(second)
  keep = np.concatenate([a, b])
  classes = subjects
  fitted = {}
  for name in feats.names:
    pred = np.empty(len(y), object)
    proba = np.zeros((len(y), len(classes)))
    scores = []
    for tr, te in ((a, b), (b, a)):
      reading = feats.fit(name, tr)
      p, pr, score = linear.fit_predict("classification", reading(tr), y[tr], reading(te),
                                        classes, seed, with_score=True)
      pred[te], proba[te] = p, pr
      scores.append(score)
    fitted[name] = (pred, proba, scores)
  choices = clinical.choice_rows(feats.names)
  for choice, candidates in choices.items():
    pred = np.empty(len(y), object)
    proba = np.zeros((len(y), len(classes)))
    for d, te in enumerate((b, a)):
      best = max(candidates, key=lambda n, d=d: np.nan_to_num(fitted[n][2][d], nan=-np.inf))
      pred[te], proba[te] = fitted[best][0][te], fitted[best][1][te]
    fitted[choice] = (pred, proba, None)
  sets = []
  for name, (pred, proba, _) in fitted.items():
    auc = np.full((2, len(classes)), np.nan)  # per direction, per subject (one-vs-rest)
    folds = []
    for d, te in enumerate((b, a)):
      folds.append(labels.score("classification", y[te], pred[te], proba[te], classes))
      auc[d] = [labels.auc(y[te] == c, proba[te][:, j]) for j, c in enumerate(classes)]
    recall = [float(np.mean(pred[keep][y[keep] == c] == c)) for c in classes]
    subject_auc = np.nanmean(auc, axis=0)
    metrics = {
        "accuracy": labels.summary(recall, point=float(np.mean(pred[keep] == y[keep]))),
        "balanced_accuracy": labels.summary(recall),
        "roc_auc": labels.summary(subject_auc.tolist()),
    }
    for m in metrics:  # per-direction values, for reference
      metrics[m]["per_direction"] = [f[m] for f in folds]
      metrics[m]["per_subject"] = metrics[m].pop("folds")
    sets.append(_entry(name, 0 if name in choices else feats.dim(name), metrics))
  tests = clinical.paired_tests("classification", y[keep].astype(object),
                                {n: f[0][keep] for n, f in fitted.items()}, groups=y[keep])
  results = {
      "target": "subject-id", "task": "classification", "main_metric": MAIN_METRIC["subject-id"],
      "scheme": "fingerprinting: train on the first half of each recording's windows, test on "
                "the second half, and the reverse; metrics on the pooled test predictions, 95% "
                "t-interval over subjects (each subject's identification rate / one-vs-rest AUC)",
      "labels_from": "subject of each recording", "n_subjects": len(subjects),
      "n_samples": int(len(keep)), "n_windows": int(len(keep)),
      "n_recordings_left_out": short, "n_folds": 2, "ci_over": "subjects", "classes": subjects,
      "chance": {"accuracy": 1.0 / len(subjects), "balanced_accuracy": 1.0 / len(subjects),
                 "roc_auc": 0.5},
      "feature_sets": sets, "seed_summary": clinical.seed_summary(sets, "accuracy"),
  }
  if tests:
    results["paired_tests"], results["paired_test"] = tests, tests[0]
  return results


# ----------------------------------------------------------------------------------------------
# The job.


DEFAULT_READINGS = {  # what each scheme reads of every encoder (features.READINGS)
    "subject": ("cls", "mean", "patches-fc", "tokens-fc", "masked-mean"),
    "cohort": ("cls", "mean", "patches-fc", "tokens-fc", "tokens-pca", "masked-cls",
               "masked-mean", "masked-tokens-fc"),
}
RANDOM_SEEDS = 3  # random-init encoders: seeds seed, seed + 1, ... (the pretraining inits)


class Probe(Evaluator):
  """`brainlm-probe`: linear probes of the run's encoder next to random-init and FC.

  Options: target ('subject-id', 'site' or a phenotype column), phenotypes (CSV/TSV),
  subject_column, task (auto | regression | classification), folds, cv (subject | site | kfold |
  session), session_column (session: the cohort table's column naming each scan's session),
  readings (features.READINGS; default per scheme, DEFAULT_READINGS), random_seeds (how many
  random-init encoders: seeds seed, seed + 1, ...), others (more pretraining runs of the same
  network, e.g. other seeds: rows `<reading>@2`, ...), mask_draws (of the masked-* readings),
  batch_size (windows per encoder call), seed (folds and the first random-init encoder),
  fisher_z (of the FC features). Phenotype columns are checked here, before any window is
  encoded.
  """
  name = "probe"
  auto_split = "all"

  def __init__(self, target: str, *, phenotypes: str | None = None,
               subject_column: str = "participant_id", task: str = "auto", folds: int = 5,
               batch_size: int = 32, seed: int = 0, fisher_z: bool = True, cv: str = "subject",
               session_column: str = "session", readings: Sequence[str] | None = None,
               random_seeds: int = RANDOM_SEEDS, others: Sequence[str] = (),
               mask_draws: int = 2, **kw):
    super().__init__(**kw)
    if task not in labels.TASKS:
      raise ValueError(f"task={task!r}; expected one of {labels.TASKS}")
    if cv not in clinical.CV_SCHEMES + ("session",):
      raise ValueError(f"cv={cv!r}; expected one of {clinical.CV_SCHEMES + ('session',)}")
    if cv not in ("subject", "session") and target == "subject-id":
      raise ValueError("--target subject-id is fingerprinting (--cv subject: halves of each "
                       "recording; --cv session: across sessions); --cv site / kfold are for "
                       "subject-level targets")
    if cv == "session" and target != "subject-id":
      raise ValueError(f"--cv session identifies subjects across sessions: it needs --target "
                       f"subject-id, not {target!r}")
    unknown = sorted(set(readings or ()) - set(features_lib.READINGS))
    if unknown:
      raise ValueError(f"unknown reading(s) {unknown}; choose from "
                       f"{', '.join(features_lib.READINGS)}")
    if random_seeds < 0 or mask_draws < 1:
      raise ValueError(f"random_seeds={random_seeds} must be >= 0 and mask_draws={mask_draws} "
                       ">= 1")
    self.cv = cv
    self.table = None
    if phenotypes and target != "subject-id":
      self.table = phenotypes_lib.read_phenotypes(phenotypes, subject_column, target)
    elif cv != "subject":
      pass  # labels / sessions from the cohort folder's table (read in `run`)
    elif target not in BUILTIN_TARGETS:
      raise ValueError(f"target {target!r} needs --phenotypes FILE with a {target!r} column; "
                       f"without one the built-in targets are {', '.join(BUILTIN_TARGETS)}")
    self.target, self.task, self.folds, self.seed = target, task, folds, seed
    self.batch_size, self.fisher_z = batch_size, fisher_z
    self.session_column, self.others, self.mask_draws = session_column, list(others), mask_draws
    self.readings = tuple(readings or DEFAULT_READINGS["subject" if cv == "subject" else
                                                       "cohort"])
    self.random_seeds = tuple(range(seed, seed + random_seeds))
    self.options = {"seed": seed, "folds": folds, "batch_size": batch_size,
                    "fisher_z": fisher_z, "subject_column": subject_column,
                    "phenotypes": phenotypes, "cv": cv, "readings": list(self.readings),
                    "random_seeds": list(self.random_seeds), "others": self.others,
                    "mask_draws": mask_draws, "session_column": session_column}

  def run(self, pre: Pretrained, out_dir: str) -> dict[str, Any]:
    sel = self.select(pre)
    others = [load_pretrained(path) for path in self.others]
    for other in others:
      if sel.split != "all" and other.subjects.get(sel.split) != pre.subjects.get(sel.split):
        logging.warning("%s holds out other subjects than %s: --split %s takes the first run's "
                        "%s subjects, some of which %s trained on (give runs of one split: "
                        "data.split_seed)", other.path, pre.path, sel.split, sel.split,
                        other.path)
    logging.info("Probing %s (step %d)%s on %d recordings of %d subjects (%d skipped)", pre.path,
                 pre.step, f" and {len(others)} more run(s)" if others else "",
                 len(sel.recordings), len(sel.subjects), len(sel.skipped))
    fingerprint = self.target == "subject-id" and self.cv == "subject"  # >= 2 windows each
    sessions, origin = self._sessions(sel) if self.cv == "session" else (None, "")
    feats = extract_features(pre, sel.recordings, readings=self.readings,
                             random_seeds=self.random_seeds, others=others,
                             batch_size=self.batch_size, fisher_z=self.fisher_z,
                             min_windows=2 if fingerprint else 1, mask_draws=self.mask_draws,
                             mask_seed=self.seed)
    n_jobs = len(os.sched_getaffinity(0))
    if self.cv == "session":
      results = identify.session_probe(feats, sel.recordings, sessions, seed=self.seed,
                                       n_jobs=n_jobs, origin=origin)
    elif self.cv == "subject":
      results = run_probe(feats, self.target, phenotypes=self.table, task=self.task,
                          folds=self.folds, seed=self.seed)
      if fingerprint:
        w = pre.model_cfg.window
        results["n_recordings_overlapping_windows"] = sum(
            w < r.num_timepoints < 2 * w for r in sel.recordings)
    else:
      values, origin = self._values(sel)
      results = clinical.cohort_probe(feats, sel.recordings, self.target, values, cv=self.cv,
                                      folds=self.folds, task=self.task, seed=self.seed,
                                      origin=origin, n_jobs=n_jobs)
    results.update(sel.describe(pre), options=self.options)
    if others:
      results["other_checkpoints"] = [{"path": o.path, "step": o.step} for o in others]
    results["report"] = write_report(results, out_dir)
    return results

  def _cohort(self, sel):
    folder = sel.data if os.path.isdir(sel.data) else os.path.dirname(sel.data)
    return cohort_lib.detect(folder, [r.path for r in sel.recordings])

  def _sessions(self, sel) -> tuple[dict[str, str], str]:
    """({recording path: session}: the cohort table's `session_column`, where it came from)."""
    group = self._cohort(sel)
    if group is None:
      raise ValueError(f"{sel.data}: --cv session reads each scan's session from a table beside "
                       f"the recordings (a .csv/.tsv whose id column names the files, with a "
                       f"{self.session_column!r} column); none was found")
    out = {r.path: group.row(r.path).get(self.session_column) for r in sel.recordings}
    if not any(v is not None for v in out.values()):
      columns = sorted({c for row in group.rows.values() for c in row})
      raise ValueError(f"{group.phenotypes}: no {self.session_column!r} column (or no value in "
                       f"it for these recordings); columns: {', '.join(columns)}; name the "
                       "session column with --session-column")
    return ({k: v for k, v in out.items() if v is not None},
            f"{group.phenotypes} (column {self.session_column!r})")

  def _values(self, sel) -> tuple[dict[str, str], str]:
    """{subject: value} of the target: --phenotypes, else the cohort folder's table."""
    return cohort_lib.subject_values(sel.data, sel.recordings, self.target, self.table)

  def summary(self, results: dict) -> dict[str, float]:
    m = results["main_metric"]
    return {f"{fs['name']}/{m}": fs["metrics"][m]["mean"] for fs in results["feature_sets"]}

  def describe(self, results: dict) -> str:
    return (f"{results['target']} ({results['task']}): {results['n_subjects']} subjects, "
            f"{results['scheme']}\n\n{format_table(results)}")
