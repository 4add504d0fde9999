"""Subject-level probes on a multi-site cohort: leave-site-out or stratified k-fold, with every
baseline in the same table (the clinical benchmark; docs/results/abide.md).

  results = cohort_probe(feats, recordings, "DX_GROUP", cv="site")

Rows (feature sets), each scored on the same folds:
  cls, mean, tokens-fc, tokens-pca, masked-*   readings of the pretrained encoder
                         (features.READINGS); tokens-fc / tokens-pca take the parcels' mean
                         tokens and principal directions from each fold's training subjects only
  model                  the reading with the best inner-CV score on each fold's training
                         subjects: chosen without the test fold
  <reading>@2, model@2, ...  the same of more pretraining runs (e.g. other seeds)
  random-<reading>, random-model (@2, ...)  the same network at random init, one set per seed
  fc                     Pearson FC of each window (Fisher z), averaged per subject
  tangent                tangent-space FC (connectivity.FoldTangents) of each subject's whole
                         recording(s), the geometric mean fitted on each fold's training
                         subjects only (a dead parcel's entries are missing, as in fc)
  mean+fc                the model's mean tokens and FC side by side: does the model add to FC?
  site                   one-hot site alone (how much the site confound predicts; under
                         leave-site-out the held-out site is unseen, so this is the prior)
Every probe is `linear.fit_predict` (scaler and penalty fitted on the training subjects, the
penalty by inner CV on them). Metrics pool the test predictions of all folds; the 95% interval
is a bootstrap over subjects (1,000 resamples); per-fold (per-site) values are kept too. The
`model` row (every run) is compared with `fc` and with `random-model` (every seed) by paired
tests on the same subjects (`paired_tests`: exact McNemar for classification, Wilcoxon
signed-rank on absolute errors for regression, one run against one; over several runs, the
Wilcoxon signed-rank test of each subject's share of runs right / mean |error|).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
import warnings
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from scipy import stats
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold
from sklearn.preprocessing import OneHotEncoder
import threadpoolctl

from brainlm_jax.data.windows import live_parcels
from brainlm_jax.transfer import connectivity, labels, linear
from brainlm_jax.transfer.features import (WindowFeatures, base_reading, row_name, run_of,
                                           source_of)

CV_SCHEMES = ("subject", "site", "kfold")
BOOTSTRAP = 1000
ROW_SOURCE = {"tangent": "fc (tangent space)", "mean+fc": "model + fc", "site": "site only",
              "model": "model (reading by inner CV)"}
CHOICE = "model"  # the row that picks a reading of the model per fold


def site_groups(sites: np.ndarray, k: int) -> dict[str, int]:
  """{site: group} for k groups of whole sites with near-equal subject counts: the largest site
  first, each to the group with the fewest subjects so far (ties: the lower group)."""
  counts = collections.Counter(sites.tolist())
  sizes, out = [0] * k, {}
  for site, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    g = int(np.argmin(sizes))
    out[site], sizes[g] = g, sizes[g] + n
  return out


def cohort_folds(y: np.ndarray, groups: np.ndarray, sites: np.ndarray, cv: str, folds: int,
                 seed: int, task: str, site_folds: int = 0
                 ) -> list[tuple[np.ndarray, np.ndarray, str]]:
  """(train, test, name) splits; no subject, and for cv='site' no site, on both sides.

  site: leave one site out (sites with a single class of y are still held out: scored pooled);
  with site_folds = k > 0 (fewer than the sites), leave one of k groups of whole sites out
  (`site_groups`), named by its sites.
  kfold: StratifiedGroupKFold, stratified by label x site (label quartile for regression),
  grouped by subject."""
  if cv == "site":
    n_sites = len(set(sites.tolist()))
    if n_sites < 2:
      raise ValueError(f"--cv site needs recordings from at least 2 sites; all are from "
                       f"{sites[0]!r}")
    if 0 < site_folds < n_sites:
      if site_folds < 2:
        raise ValueError(f"site_folds={site_folds}: need at least 2 groups of sites")
      group_of = site_groups(sites, site_folds)
      site_ids = np.asarray([group_of[s] for s in sites.tolist()])
    else:
      site_ids = sites
    return [(tr, te, "+".join(sorted(set(sites[te].tolist()))))
            for tr, te in LeaveOneGroupOut().split(np.zeros(len(y)), y, site_ids)]
  if cv != "kfold":
    raise ValueError(f"cv={cv!r}; expected one of {CV_SCHEMES}")
  strat = (y.astype(str) if task == "classification" else
           np.digitize(y, np.quantile(y, [0.25, 0.5, 0.75])).astype(str))
  strat = np.char.add(np.char.add(strat, "|"), sites.astype(str))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # strata smaller than the folds are fine
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te, f"fold {i}") for i, (tr, te) in
            enumerate(splitter.split(np.zeros(len(y)), strat, groups))]


def inner_split(train: np.ndarray, sites: np.ndarray, y: np.ndarray, cv: str, fraction: float,
                seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
  """(fit, validation) indices of the training fold `train`: whole sites (cv='site', in a
  seeded order, until `fraction` of its subjects) or one stratified fold of ~1/fraction
  subjects. Only training-fold subjects are read."""
  train = np.asarray(train)
  fold_sites = sorted(set(sites[train].tolist()))
  if cv == "site" and len(fold_sites) >= 3:
    order = np.random.default_rng(seed).permutation(fold_sites)
    counts = collections.Counter(sites[train].tolist())
    val_sites, n = [], 0
    for s in order[:-1]:  # at least one site left to train on
      val_sites.append(s)
      n += counts[s]
      if n >= fraction * len(train):
        break
    val = np.isin(sites[train], val_sites)
    return train[~val], train[val]
  strat = y[train].astype(str) if task == "classification" else np.digitize(
      y[train], np.quantile(y[train], [0.25, 0.5, 0.75])).astype(str)
  k = max(2, int(round(1 / fraction)))
  splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  fit, val = next(splitter.split(np.zeros(len(train)), strat, np.arange(len(train))))
  return train[fit], train[val]


def _bootstrap(task: str, y, pred, proba, classes, seed: int) -> dict[str, list[float]]:
  rng = np.random.default_rng(seed)
  draws = collections.defaultdict(list)
  for _ in range(BOOTSTRAP):
    i = rng.integers(len(y), size=len(y))
    for m, v in labels.score(task, y[i], pred[i], None if proba is None else proba[i],
                             classes).items():
      draws[m].append(v)
  return {m: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
          for m, v in draws.items()}


def _paired_test(task: str, y, a_pred, b_pred) -> dict[str, Any]:
  """a vs b on the same subjects: exact McNemar (classification) or Wilcoxon on |error|."""
  if task == "classification":
    a_ok, b_ok = a_pred == y, b_pred == y
    n01, n10 = int(np.sum(a_ok & ~b_ok)), int(np.sum(~a_ok & b_ok))
    p = float(stats.binomtest(n01, n01 + n10).pvalue) if n01 + n10 else 1.0
    return {"test": "exact McNemar", "only_a_right": n01, "only_b_right": n10, "p_value": p}
  da, db = np.abs(a_pred - y), np.abs(b_pred - y)
  p = float(stats.wilcoxon(da, db).pvalue) if np.any(da != db) else 1.0
  return {"test": "Wilcoxon signed-rank on |error|", "median_abs_error_a": float(np.median(da)),
          "median_abs_error_b": float(np.median(db)), "p_value": p}


def _fit_fold(make, tr, te, y_tr, task, classes, seed):
  x_tr, x_te = make(tr, te)
  return (*linear.fit_predict(task, x_tr, y_tr, x_te, classes, seed, with_score=True),
          x_tr.shape[1])


def _fit_jobs(rows: dict[str, Callable], y, splits, task, classes, seed, n_jobs
              ) -> dict[tuple[str, str], tuple]:
  """{(row, fold): (pred, proba, inner score, dim)}: every row's fit on every fold, on `n_jobs`
  threads, submitted fold after fold; a line per finished fold with the time left."""
  start, out = time.perf_counter(), {}
  # One BLAS thread per job, set once here for the whole pool: the limit is process-wide, and
  # OpenBLAS's own threads under ours overflow its buffer pool ("BLAS : Bad memory
  # unallocation!"). The same setting for any n_jobs: the same numbers.
  limit = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
  pool = concurrent.futures.ThreadPoolExecutor(max(1, n_jobs))
  try:
    jobs = {(name, fold): pool.submit(_fit_fold, make, tr, te, y[tr], task, classes, seed)
            for tr, te, fold in splits for name, make in rows.items()}
    for i, (_, _, fold) in enumerate(splits, 1):
      out.update(((name, fold), jobs[name, fold].result()) for name in rows)
      spent = time.perf_counter() - start
      logging.info("clinical fold %d/%d (%s): %d rows fitted | %.0f s | ETA %.0f s", i,
                   len(splits), fold, len(rows), spent, spent / i * (len(splits) - i))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    limit.restore_original_limits()
  return out


def evaluate_rows(rows: dict[str, Callable | tuple[str, ...]], y: np.ndarray, splits, task: str,
                  classes: list, seed: int, n_jobs: int = 1
                  ) -> tuple[list[dict], dict[str, np.ndarray]]:
  """Scores each row (`make(train, test) -> (x_train, x_test)`) on `splits`: pooled metrics with
  a bootstrap interval, and the per-fold values. A row given as a tuple of earlier rows' names
  takes, per fold, the prediction of the one with the best inner-CV score (`linear.inner_score`,
  training subjects only).

  Each (row, fold) is one job, `make` then the fit, run on `n_jobs` threads fold after fold, a
  fold's rows side by side: a row whose features are costly to make (tangent: matrix
  decompositions, which release the GIL) runs beside the cheap rows' fits (mostly Python, which
  hold it). `make` may be called from any thread, in any order. Each fit is deterministic: the
  results are the same for any n_jobs. Returns (entries, pooled predictions)."""
  fitted = _fit_jobs({n: m for n, m in rows.items() if not isinstance(m, tuple)}, y, splits,
                     task, classes, seed, n_jobs)
  entries, preds = [], {}
  for name, make in rows.items():
    pred = np.empty(len(y), object if task == "classification" else np.float64)
    proba = np.zeros((len(y), len(classes))) if task == "classification" else None
    dim, chosen = 0, {}
    for tr, te, fold in splits:
      if isinstance(make, tuple):  # the choice: the best inner-CV score among those rows
        best = max(make, key=lambda r, f=fold: np.nan_to_num(fitted[r, f][2], nan=-np.inf))
        chosen[fold] = best
        p, pr, _, dim = fitted[best, fold]
      else:
        p, pr, _, dim = fitted[name, fold]
      if p is None:  # a training fold with one class: predict it
        p, pr = np.asarray([y[tr][0]] * len(te), object), np.zeros((len(te), len(classes)))
        pr[:, classes.index(y[tr][0])] = 1.0
      pred[te] = p
      if proba is not None:
        proba[te] = pr
    entries.append(pooled_entry(name, y, pred, proba, splits, task, classes, seed, dim))
    if chosen:
      entries[-1]["chosen"] = chosen
      entries[-1]["chosen_counts"] = dict(collections.Counter(chosen.values()))
    preds[name] = pred
  return entries, preds


def pooled_entry(name: str, y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, splits,
                 task: str, classes: list, seed: int, dim: int = 0,
                 source: str | None = None) -> dict:
  """A row's report entry from its pooled test predictions (every subject predicted by the fold
  that held it out): pooled metrics with a 95% bootstrap interval over subjects, and per fold."""
  per_fold = {fold: labels.score(task, y[te], pred[te], None if proba is None else proba[te],
                                 classes) for _, te, fold in splits}
  pooled = labels.score(task, y, pred, proba, classes)
  ci = _bootstrap(task, y, pred, proba, classes, seed)
  metrics = {m: {"mean": pooled[m], "ci95": ci[m], "folds": [per_fold[f][m] for f in per_fold]}
             for m in labels.METRICS[task]}
  logging.info("clinical %-12s %s", name, "  ".join(f"{m} {v['mean']:.3f}"
                                                    for m, v in metrics.items()))
  return {"name": name, "source": source or ROW_SOURCE.get(name, source_of(name)),
          "dim": int(dim), "metrics": metrics, "per_fold": per_fold}


def subject_table(feats: WindowFeatures, recordings: Sequence, values: dict[str, str]):
  """Per subject with a value: (subjects, label strings, sites, fixed rows' window-feature means,
  the index of the subject's recordings, the indices of the subject's windows)."""
  site_of = {}
  for r in recordings:
    site_of.setdefault(r.subject, r.site or os.path.basename(os.path.dirname(r.path)))
  subjects = [s for s in dict.fromkeys(feats.subject.tolist()) if s in values]
  rows = [np.flatnonzero(feats.subject == s) for s in subjects]
  means = {name: subject_means(feats.features[name], rows) for name in feats.names
           if feats.fixed(name)}
  recs = {s: [i for i, r in enumerate(recordings) if r.subject == s] for s in subjects}
  return (np.asarray(subjects), [values[s] for s in subjects],
          np.asarray([site_of[s] for s in subjects]), means, recs, rows)


def subject_means(x: np.ndarray, rows: Sequence[np.ndarray], offset: np.ndarray | None = None
                  ) -> np.ndarray:
  """[len(rows), F]: the mean of `x`'s rows `rows[i]` (offset by `offset`: where the rows of
  x start, when x holds only some windows), NaN (missing) left out."""
  out = np.empty((len(rows), x.shape[1]), np.result_type(x.dtype, np.float32))
  for i, r in enumerate(rows):  # np.nanmean without its warning (not thread-safe to silence)
    v = x[r if offset is None else offset[r]]
    seen = ~np.isnan(v)
    n = seen.sum(axis=0)
    out[i] = np.where(n > 0, np.where(seen, v, 0).sum(axis=0) / np.maximum(n, 1), np.nan)
  return out


def fitted_subject_row(feats: WindowFeatures, name: str, rows: Sequence[np.ndarray]) -> Callable:
  """make(train, test) of a reading whose statistics are fitted (`feats.fit`) on the training
  subjects' windows only; each subject's windows averaged."""
  def make(tr, te):
    reading = feats.fit(name, np.concatenate([rows[i] for i in tr]))
    out = []
    for side in (tr, te):
      windows = np.concatenate([rows[i] for i in side])
      where = np.full(len(feats.subject), -1)
      where[windows] = np.arange(len(windows))
      out.append(subject_means(reading(windows), [rows[i] for i in side], where))
    return tuple(out)
  return make


def choice_rows(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """{choice row: its candidate rows}: per pretraining run and per random-init seed, the row
  `model` (`model@k`, `random-model`, ...) that picks, fold by fold, the run's reading with the
  best inner-CV score, when it has more than one."""
  groups = collections.defaultdict(list)
  for n in names:
    if source_of(n) in ("model", "random-init"):
      groups[source_of(n) == "random-init", run_of(n)].append(n)
  return {row_name(CHOICE, random, run): tuple(g) for (random, run), g in groups.items()
          if len(g) > 1}


def paired_runs_test(task: str, y, a_preds: Sequence[np.ndarray],
                     b_preds: Sequence[np.ndarray], groups: np.ndarray | None = None
                     ) -> dict[str, Any]:
  """Rows a vs b on the same subjects. One prediction each: exact McNemar (classification) or
  Wilcoxon signed-rank on |error| (regression). Several (runs, seeds): the Wilcoxon signed-rank
  test of each subject's mean correctness (or mean |error|) over a's runs against b's. The
  spread between seeds is not in the p-value: it is about these runs (`seed_summary` shows
  the spread).

  groups [n] (classification): the samples are not independent within a group (the windows of
  one subject): always the Wilcoxon signed-rank test of each group's share right, averaged over
  the runs, never a test that counts samples."""
  if groups is not None:
    if task != "classification":
      raise ValueError("paired tests over groups are for classification")
    groups = np.asarray(groups)
    units = sorted(set(groups.tolist()), key=str)

    def rates(ps):
      return np.mean([[np.mean(p[groups == u] == y[groups == u]) for u in units] for p in ps],
                     axis=0)
    a, b = rates(a_preds), rates(b_preds)
    name = ("Wilcoxon signed-rank on each subject's share of samples right"
            + (", averaged over runs" if len(a_preds) > 1 or len(b_preds) > 1 else ""))
  elif len(a_preds) == 1 and len(b_preds) == 1:
    return _paired_test(task, y, a_preds[0], b_preds[0])
  elif task == "classification":
    a = np.mean([p == y for p in a_preds], axis=0)
    b = np.mean([p == y for p in b_preds], axis=0)
    name = "Wilcoxon signed-rank on each subject's share of runs right"
  else:
    a = np.mean([np.abs(p - y) for p in a_preds], axis=0)
    b = np.mean([np.abs(p - y) for p in b_preds], axis=0)
    name = "Wilcoxon signed-rank on each subject's mean |error| over runs"
  # Shares of runs (or windows) are fractions: 2/3 - 1 and 1/3 - 0 must tie in the ranks, but
  # differ in the last bit in float (which ranked every such pair in one order and made the
  # p-value orders of magnitude too small); round the differences first.
  d = np.round(a - b, 9)
  better = (d > 0) if task == "classification" else (d < 0)
  worse = (d < 0) if task == "classification" else (d > 0)
  p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
  return {"test": name, "runs_a": len(a_preds), "runs_b": len(b_preds),
          "subjects_a_better": int(better.sum()), "subjects_b_better": int(worse.sum()),
          "p_value": p}


def runs_of(name: str, names: Sequence[str]) -> list[str]:
  """Row `name` and its other runs / seeds (`name@2`, ...) among `names`."""
  return [n for n in names if n == name or n.startswith(name + "@")]


def paired_tests(task: str, y, preds: dict[str, np.ndarray],
                 groups: np.ndarray | None = None) -> list[dict]:
  """The tests a reader of a probe needs, on the same subjects: the pretrained model (every
  run) against fc and against the same network at random init (every seed), and each run
  against its own init (run k's seed is random seed k when the seeds match). groups: the
  subject of each sample when a subject has several (windows): tests over subjects
  (`paired_runs_test`)."""
  names = list(preds)
  model = CHOICE if CHOICE in preds else next((n for n in names if source_of(n) == "model"), None)
  if model is None:
    return []
  random = row_name(CHOICE, True) if row_name(CHOICE, True) in preds else (
      "random-" + model if "random-" + model in preds else None)
  tests = []
  for b in ("fc", random):
    if b is None or b not in preds:
      continue
    a_runs, b_runs = runs_of(model, names), runs_of(b, names)
    tests.append({"a": " + ".join(a_runs), "b": " + ".join(b_runs),
                  **paired_runs_test(task, y, [preds[n] for n in a_runs],
                                     [preds[n] for n in b_runs], groups)})
    if b == random and len(a_runs) > 1:
      for a_k, b_k in zip(a_runs, b_runs):
        tests.append({"a": a_k, "b": b_k,
                      **paired_runs_test(task, y, [preds[a_k]], [preds[b_k]], groups)})
  return tests


def seed_summary(entries: Sequence[dict], metric: str) -> list[dict]:
  """Per reading, `metric` of the pretrained runs and of the random-init seeds: values, mean,
  min, max (the spread that tells a pretraining effect from seed noise)."""
  groups: dict[str, dict[str, list]] = {}
  for e in entries:
    source = source_of(e["name"])
    if source not in ("model", "random-init"):
      continue
    g = groups.setdefault(base_reading(e["name"]), {"model": [], "random-init": []})
    g[source].append(e["metrics"][metric]["mean"])
  out = []
  for reading, g in groups.items():
    row = {"reading": reading}
    for source, v in g.items():
      if v:
        row[source] = {"values": v, "mean": float(np.mean(v)), "min": float(np.min(v)),
                       "max": float(np.max(v))}
    out.append(row)
  return out


def _fixed(x: np.ndarray) -> Callable:
  return lambda tr, te: (x[tr], x[te])


def baseline_rows(recordings: Sequence, subjects: np.ndarray, sites: np.ndarray,
                  recs: dict[str, list[int]], tangent: bool = True) -> dict[str, Callable]:
  """The cohort baselines' `make(train, test)`: `tangent` (tangent-space FC of each subject's
  whole recording(s), the geometric mean fitted on the training subjects only; a parcel dead in
  any of the subject's scans leaves its pairs missing, as in fc) and `site` (one-hot site)."""
  rows = {}
  if tangent:
    dead = connectivity.missing_pairs(np.stack([
        np.all([live_parcels(recordings[i].signal) > 0 for i in recs[s]], axis=0)
        for s in subjects]))
    folds_ts = connectivity.FoldTangents(lambda: np.stack([
        connectivity.covariances([recordings[i].signal for i in recs[s]]).mean(0)
        for s in subjects]))
    rows["tangent"] = lambda tr, te: tuple(x * dead[i] for x, i in zip(folds_ts(tr, te), (tr, te)))
  encoder = lambda tr: OneHotEncoder(handle_unknown="ignore").fit(sites[tr, None])  # noqa: E731
  rows["site"] = lambda tr, te: tuple(encoder(tr).transform(sites[i, None]).toarray()
                                      for i in (tr, te))
  return rows


def cohort_probe(feats: WindowFeatures, recordings: Sequence, target: str,
                 values: dict[str, str], *, cv: str = "site", folds: int = 10,
                 task: str = "auto", seed: int = 0, origin: str = "phenotype table",
                 tangent: bool = True, n_jobs: int = 1) -> dict[str, Any]:
  """Every row of the module docstring for `target` (`values`: subject -> raw value); the folds'
  fits on `n_jobs` threads."""
  subjects, raw, sites, means, recs, windows = subject_table(feats, recordings, values)
  n_missing = len(set(feats.subject.tolist())) - len(subjects)
  if len(subjects) < 4:
    raise ValueError(f"only {len(subjects)} subject(s) have a {target!r} value ({origin})")
  task, y = labels.target_values(target, raw, subjects.tolist(), task, option="--task")
  classes = labels.sorted_classes(y.tolist()) if task == "classification" else []
  if task == "classification" and len(classes) < 2:
    raise ValueError(f"target {target!r} is constant ({classes}); nothing to predict")
  splits = cohort_folds(y, subjects, sites, cv, folds, seed, task)

  rows = {name: _fixed(means[name]) if feats.fixed(name) else
          fitted_subject_row(feats, name, windows) for name in feats.names}
  rows.update(choice_rows(feats.names))
  if "mean" in means and "fc" in means:
    rows["mean+fc"] = _fixed(np.concatenate([means["mean"], means["fc"]], axis=1))
  rows.update(baseline_rows(recordings, subjects, sites, recs, tangent=tangent))
  entries, preds = evaluate_rows(rows, y, splits, task, classes, seed, n_jobs)
  main = "accuracy" if task == "classification" else "r2"
  results = {
      "target": target, "task": task, "main_metric": main, "cv": cv,
      "scheme": ("leave one site out" if cv == "site" else
                 f"{len(splits)}-fold stratified by label and site, grouped by subject")
      + "; window features averaged per subject; metrics on the pooled test predictions, "
        "95% bootstrap interval over subjects",
      "labels_from": origin, "n_subjects": len(subjects), "n_samples": len(subjects),
      "n_windows": int(np.isin(feats.subject, subjects).sum()),
      "n_subjects_without_value": n_missing, "n_folds": len(splits), "ci_over": "bootstrap",
      "folds": [{"name": f, "n_test": int(len(te))} for _, te, f in splits],
      "sites": dict(collections.Counter(sites.tolist())), "classes": classes,
      "chance": labels.chance(task, y, classes), "feature_sets": entries,
      "seed_summary": seed_summary(entries, main),
  }
  if task == "classification":
    results["class_counts"] = dict(collections.Counter(y.tolist()))
  tests = paired_tests(task, y, preds)
  if tests:
    results["paired_tests"] = tests
    results["paired_test"] = tests[0]  # the model (every run) against fc
  return results
