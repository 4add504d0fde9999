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
"""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any, Mapping

from absl import logging
import numpy as np
import threadpoolctl

from brainlm_jax.data import cohort as cohort_lib
from brainlm_jax.data import phenotypes as phenotypes_lib
from brainlm_jax.data.phenotypes import norm_subject
from brainlm_jax.transfer import clinical
from brainlm_jax.transfer import labels
from brainlm_jax.transfer import linear
from brainlm_jax.transfer import plots
from brainlm_jax.transfer import report
from brainlm_jax.transfer import features as features_lib
from brainlm_jax.transfer.features import WindowFeatures, extract_features, source_of
from brainlm_jax.transfer.run import Evaluator, Pretrained

BUILTIN_TARGETS = ("subject-id", "site")
MAIN_METRIC = {"regression": "r2", "classification": "balanced_accuracy",
               "subject-id": "accuracy"}


def _entry(name: str, x: np.ndarray, metrics: dict) -> dict:
  logging.info("probe %-12s %s", name, "  ".join(f"{m} {v['mean']:.3f}" for m, v in
                                                 metrics.items()))
  return {"name": name, "source": source_of(name), "dim": int(x.shape[1]),
          "metrics": metrics}


def _evaluate(features: Mapping[str, np.ndarray], y: np.ndarray, splits, task: str,
              classes: list, seed: int) -> list[dict]:
  """Every feature set on the same (train, test) splits; metrics over the folds."""
  out = []
  for name, x in features.items():
    folds = []
    for tr, te in splits:
      pred, proba = linear.fit_predict(task, x[tr], y[tr], x[te], classes, seed)
      folds.append(labels.score(task, y[te], pred, proba, classes))
    out.append(_entry(name, x, {m: labels.summary([f[m] for f in folds])
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
  index = [np.asarray(units[k]) for k in keys]
  with warnings.catch_warnings():  # NaN (missing: dead-parcel FC pairs) stays NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    features = {name: np.stack([np.nanmean(x[have][ix], axis=0) for ix in index])
                for name, x in feats.features.items()}
  splits = labels.subject_folds(y, groups, task, folds, seed)
  results = {
      "target": target, "task": task, "main_metric": MAIN_METRIC[task],
      "scheme": f"{folds}-fold cross-validation split by subject; window features averaged "
                "per subject",
      "labels_from": origin, "n_subjects": n_subjects, "n_samples": len(y),
      "n_windows": int(have.sum()), "n_subjects_without_value": n_missing, "n_folds": folds,
      "ci_over": "folds",
      "classes": classes, "chance": labels.chance(task, y, classes),
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
      p, proba = linear.fit_predict("classification", x[tr], y[tr], x[te], classes, seed)
      pred[te] = p
      folds.append(labels.score("classification", y[te], p, proba, classes))
      auc[d] = [labels.auc(y[te] == c, proba[:, j]) for j, c in enumerate(classes)]
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


def format_table(results: dict) -> str:
  """Markdown table: one row per feature set, best mean per metric in bold, chance last."""
  sets = results["feature_sets"]
  metrics = list(sets[0]["metrics"]) if sets else []
  return report.metric_table(sets, metrics, chance=results.get("chance", {}))


def _ci_units(results: dict) -> str:
  if results.get("ci_over") == "bootstrap":
    return f"{results['n_subjects']} subjects (bootstrap, pooled folds)"
  if results.get("ci_over") == "subjects":
    return f"{results['n_subjects']} subjects"
  return f"{results['n_folds']} folds"


def _markdown(results: dict) -> str:
  head = [f"# Linear probe: `{results['target']}` ({results['task']})", ""]
  ck = results.get("checkpoint")
  if ck:
    head.append(f"- checkpoint: `{ck['path']}` (step {ck['step']})")
  if results.get("data"):
    head.append(f"- data: `{results['data']}` ({results.get('split', 'all')})")
  head += [f"- {results['n_subjects']} subjects, {results['n_samples']} samples "
           f"({results['n_windows']} windows); labels from {results['labels_from']}",
           f"- scheme: {results['scheme']}",
           f"- main metric: {results['main_metric']}; values are "
           + ("pooled score ± half-width of its 95% bootstrap interval over subjects"
              if results.get("ci_over") == "bootstrap" else
              f"mean ± 95% t-interval half-width over {_ci_units(results)}")
           + "; best per metric in bold",
           "- probes: StandardScaler + RidgeCV / LogisticRegressionCV (inner CV)"]
  overlap = results.get("pretraining_overlap")
  if overlap:
    head.append(f"- subjects also in pretraining: {overlap['train']} train, "
                f"{overlap['validation']} validation (of {overlap['probe_subjects']})")
  test = results.get("paired_test")
  tail = [f"Paired test, `{test['a']}` vs `{test['b']}` on the same subjects ({test['test']}): "
          f"p = {test['p_value']:.3g}."] if test else []
  tail += [_per_site_table(results)] if results.get("cv") == "site" else []
  return ("\n".join(head) + "\n\n" + format_table(results) + "\n"
          + "".join(f"\n{t}\n" for t in tail))


def _per_site_table(results: dict) -> str:
  """Main metric of every row on each held-out site."""
  m = results["main_metric"]
  sets = results["feature_sets"]
  lines = ["| held-out site | n | " + " | ".join(e["name"] for e in sets) + " |",
           "|---|---:|" + "---:|" * len(sets)]
  for fold in results["folds"]:
    cells = [f"{e['per_fold'][fold['name']][m]:.3f}" for e in sets]
    lines.append(f"| {fold['name']} | {fold['n_test']} | " + " | ".join(cells) + " |")
  return f"{m} per held-out site:\n\n" + "\n".join(lines)


def _plot(results: dict, path: str) -> str:
  m = results["main_metric"]
  return plots.plot_scores(
      results["feature_sets"], m, path, chance=results.get("chance", {}).get(m),
      ylabel=f"{m} (mean, 95% CI over {_ci_units(results)})",
      title=f"Linear probe: {results['target']} ({results['task']}, "
            f"{results['n_subjects']} subjects)")


def write_report(results: dict, out_dir: str) -> dict[str, str]:
  """probe.json (all metrics, per fold too), probe.md (table) and probe.png (main metric per
  feature set with 95% CI bars). Returns {'json', 'md', 'png'} paths."""
  results = report.jsonable(results)
  return report.write_report(results, out_dir, "probe", _markdown(results),
                             figures={"png": ("probe.png", lambda p: _plot(results, p))})


# ----------------------------------------------------------------------------------------------
# The job.


class Probe(Evaluator):
  """`brainlm-probe`: linear probes of the run's encoder next to random-init and FC.

  Options: target ('subject-id', 'site' or a phenotype column), phenotypes (CSV/TSV),
  subject_column, task (auto | regression | classification), folds, batch_size (windows per
  encoder call), seed (folds and the random-init encoder), fisher_z (of the FC features).
  Phenotype columns are checked here, before any window is encoded.
  """
  name = "probe"
  auto_split = "all"

  def __init__(self, target: str, *, phenotypes: str | None = None,
               subject_column: str = "participant_id", task: str = "auto", folds: int = 5,
               batch_size: int = 32, seed: int = 0, fisher_z: bool = True, cv: str = "subject",
               **kw):
    super().__init__(**kw)
    if task not in labels.TASKS:
      raise ValueError(f"task={task!r}; expected one of {labels.TASKS}")
    if cv not in clinical.CV_SCHEMES:
      raise ValueError(f"cv={cv!r}; expected one of {clinical.CV_SCHEMES}")
    if cv != "subject" and target == "subject-id":
      raise ValueError("--target subject-id is fingerprinting (its own scheme); --cv site / "
                       "kfold are for subject-level targets")
    self.cv = cv
    self.table = None
    if phenotypes and target != "subject-id":
      self.table = phenotypes_lib.read_phenotypes(phenotypes, subject_column, target)
    elif cv != "subject":
      pass  # labels from the cohort folder's phenotype table (read in `run`)
    elif target not in BUILTIN_TARGETS:
      raise ValueError(f"target {target!r} needs --phenotypes FILE with a {target!r} column; "
                       f"without one the built-in targets are {', '.join(BUILTIN_TARGETS)}")
    self.target, self.task, self.folds, self.seed = target, task, folds, seed
    self.batch_size, self.fisher_z = batch_size, fisher_z
    self.options = {"seed": seed, "folds": folds, "batch_size": batch_size,
                    "fisher_z": fisher_z, "subject_column": subject_column,
                    "phenotypes": phenotypes, "cv": cv}

  def run(self, pre: Pretrained, out_dir: str) -> dict[str, Any]:
    sel = self.select(pre)
    logging.info("Probing %s (step %d) on %d recordings of %d subjects (%d skipped)", pre.path,
                 pre.step, len(sel.recordings), len(sel.subjects), len(sel.skipped))
    sets = features_lib.FEATURE_SETS + (features_lib.EXTRA_SETS if self.cv != "subject" else ())
    fingerprint = self.target == "subject-id"  # needs >= 2 windows per recording
    feats = extract_features(pre, sel.recordings, batch_size=self.batch_size, seed=self.seed,
                             fisher_z=self.fisher_z, feature_sets=sets,
                             min_windows=2 if fingerprint else 1)
    if self.cv == "subject":
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
                                      origin=origin, n_jobs=len(os.sched_getaffinity(0)))
    results.update(sel.describe(pre), options=self.options)
    results["report"] = write_report(results, out_dir)
    return results

  def _values(self, sel) -> tuple[dict[str, str], str]:
    """{subject: value} of the target: --phenotypes, else the cohort folder's table."""
    if self.table is not None:
      return {s: self.table[norm_subject(s)] for s in sel.subjects
              if norm_subject(s) in self.table}, "phenotype file"
    folder = sel.data if os.path.isdir(sel.data) else os.path.dirname(sel.data)
    group = cohort_lib.detect(folder, [r.path for r in sel.recordings])
    if group is None:
      raise ValueError(f"{sel.data}: no phenotype table beside the recordings names them; pass "
                       f"--phenotypes FILE (with a {self.target!r} column)")
    values = {}
    for r in sel.recordings:
      v = group.row(r.path).get(self.target)
      if v is not None:
        values.setdefault(r.subject, v)
    if not values:
      columns = sorted({c for row in group.rows.values() for c in row})
      raise ValueError(f"{group.phenotypes}: no recording has a {self.target!r} value; "
                       f"columns: {', '.join(columns)}")
    return values, f"{group.phenotypes} (column {self.target!r})"

  def summary(self, results: dict) -> dict[str, float]:
    m = results["main_metric"]
    return {f"{fs['name']}/{m}": fs["metrics"][m]["mean"] for fs in results["feature_sets"]}

  def describe(self, results: dict) -> str:
    return (f"{results['target']} ({results['task']}): {results['n_subjects']} subjects, "
            f"{results['scheme']}\n\n{format_table(results)}")
