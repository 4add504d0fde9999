"""Cross-session identification (Finn et al. 2015 fingerprinting): who is this window of one
session's scan, among every subject's scans of another session?

  results = session_probe(feats, recordings, sessions, seed=0)

For each ordered pair of sessions (a, b) (both directions for two days): the queries are the
non-overlapping windows (the model's window) of session a's scans; the gallery is session b's
scans, one vector per scan (its window features averaged). A row's statistics (the fitted token
readings' parcel means and components, the imputation of missing features) come from the gallery
session only. Two identifiers, on the same queries:
  match   the gallery scan with the highest Pearson correlation to the query's features gives
          its subject (Finn et al.'s rule; no training)
  linear  a linear classifier (`linear.fit_predict`: scaler and penalty by inner CV, its folds
          keeping each gallery scan's windows together) trained on the gallery session's
          windows, one class per subject
Only subjects with scans in both sessions count. Metrics pool every query of both directions;
the 95% interval is the t-interval over subjects of their identification rates. The `model` row
(and `random-model`) picks per direction the reading with the best inner-CV score of its linear
classifier on the gallery session. Paired tests on the same subjects (model vs fc, model vs
random init, each run vs its own init): the Wilcoxon signed-rank test of each subject's
identification rate, averaged over the runs when a row has several (`clinical.paired_runs_test`
with the queries' subjects as groups: a subject's queries are not independent).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
from typing import Any, Sequence

from absl import logging
import numpy as np
import threadpoolctl

from brainlm_jax.transfer import clinical, labels, linear
from brainlm_jax.transfer.features import WindowFeatures, source_of

METHODS = ("match", "linear")


def _impute(gallery: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """NaN (missing features) -> the gallery's column means (0 where a column is all missing)."""
  fill = np.nan_to_num(clinical.subject_means(gallery, [np.arange(len(gallery))])[0])
  return [np.where(np.isnan(x), fill, x) for x in (gallery, *others)]


def correlation_match(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """int [n_queries]: the index of each query's gallery row with the highest Pearson
  correlation (over features)."""
  def unit(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.argmax(unit(queries) @ unit(gallery).T, axis=1)


def _directions(sessions: np.ndarray) -> list[tuple[str, str]]:
  names = sorted(set(sessions.tolist()), key=str)
  return list(itertools.permutations(names, 2))


def _identify(feats: WindowFeatures, name: str, q: np.ndarray, g: np.ndarray,
              g_scans: list[np.ndarray], g_subjects: np.ndarray, classes: list, seed: int):
  """One row, one direction: (matched subject [n_q], classifier's subject [n_q], inner score)."""
  reading = feats.fit(name, g)
  xg, xq = reading(g), reading(q)
  where = np.full(len(feats.subject), -1)
  where[g] = np.arange(len(g))
  scans = clinical.subject_means(xg, g_scans, where)
  scans, queries = _impute(scans, xq)
  matched = g_subjects[correlation_match(queries, scans)]
  xg, xq = _impute(xg, xq)
  pred, _, score = linear.fit_predict("classification", xg, feats.subject[g], xq, classes, seed,
                                      with_score=True, groups=feats.recording[g])
  return matched, np.asarray(pred, object), score


def session_probe(feats: WindowFeatures, recordings: Sequence, sessions: dict[str, str], *,
                  seed: int = 0, n_jobs: int = 1, origin: str = "cohort table") -> dict[str, Any]:
  """Cross-session identification with every row of `feats` (module docstring).

  Args:
    sessions: recording path -> session (e.g. the day); recordings without one are left out.
  Raises:
    ValueError: fewer than 2 sessions, or fewer than 2 subjects with scans in two sessions.
  """
  rec_session = np.asarray([sessions.get(r.path) for r in recordings], object)
  win_session = rec_session[feats.recording]
  known = np.asarray([s is not None for s in win_session])
  by_subject = collections.defaultdict(set)
  for r, s in zip(recordings, rec_session):
    if s is not None:
      by_subject[r.subject].add(s)
  if len({s for s in rec_session if s is not None}) < 2:
    raise ValueError(f"--cv session needs recordings from at least 2 sessions ({origin}); "
                     f"found {sorted({str(s) for s in rec_session if s is not None})}")
  subjects = sorted(s for s, v in by_subject.items() if len(v) >= 2)
  if len(subjects) < 2:
    raise ValueError(labels.too_few_subjects(
        sorted(by_subject), what="cross-session identification (subjects with scans in two "
        "sessions)"))
  keep = known & np.isin(feats.subject, subjects)
  directions = [(a, b) for a, b in _directions(win_session[keep].astype(str))]
  names = feats.names
  jobs = {}
  units = {}  # direction -> (queries, gallery windows, gallery scans, their subjects)
  for a, b in directions:
    g = np.flatnonzero(keep & (win_session == b))
    # queries only of subjects the gallery holds (with > 2 sessions, not every subject has all)
    q = np.flatnonzero(keep & (win_session == a) & np.isin(feats.subject, feats.subject[g]))
    scans = sorted(set(feats.recording[g].tolist()))
    g_scans = [g[feats.recording[g] == i] for i in scans]
    g_subjects = np.asarray([recordings[i].subject for i in scans], object)
    units[a, b] = (q, g, g_scans, g_subjects)
  classes = sorted(subjects)
  start = time.perf_counter()
  limit = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
  pool = concurrent.futures.ThreadPoolExecutor(max(1, n_jobs))
  try:
    for d in directions:
      for name in names:
        jobs[name, d] = pool.submit(_identify, feats, name, units[d][0], units[d][1],
                                    units[d][2], units[d][3], classes, seed)
    fitted = {}
    for i, d in enumerate(directions, 1):
      fitted.update({(n, d): jobs[n, d].result() for n in names})
      spent = time.perf_counter() - start
      logging.info("identification %s -> %s (%d/%d): %d rows | %.0f s | ETA %.0f s", d[0], d[1],
                   i, len(directions), len(names), spent, spent / i * (len(directions) - i))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    limit.restore_original_limits()
  choices = clinical.choice_rows(names)
  for choice, candidates in choices.items():
    for d in directions:
      best = max(candidates, key=lambda n, d=d: np.nan_to_num(fitted[n, d][2], nan=-np.inf))
      fitted[choice, d] = (*fitted[best, d][:2], best)
  queries = np.concatenate([units[d][0] for d in directions])
  truth = feats.subject[queries].astype(object)
  q_subject = feats.subject[queries]
  entries, preds = [], {m: {} for m in METHODS}
  for name in names + list(choices):
    metrics, dims = {}, None
    for k, method in enumerate(METHODS):
      pred = np.concatenate([fitted[name, d][k] for d in directions]).astype(object)
      preds[method][name] = pred
      right = pred == truth
      rates = [float(right[q_subject == s].mean()) for s in subjects]
      metrics[f"{method}_accuracy"] = labels.summary(rates, point=float(right.mean()))
      metrics[f"{method}_accuracy"]["per_subject"] = metrics[f"{method}_accuracy"].pop("folds")
      metrics[f"{method}_accuracy"]["per_direction"] = [
          float(np.mean(fitted[name, d][k] == feats.subject[units[d][0]])) for d in directions]
    entry = {"name": name, "source": clinical.ROW_SOURCE.get(name, source_of(name)),
             "dim": 0 if name in choices else feats.dim(name), "metrics": metrics}
    if name in choices:
      entry["chosen"] = {f"{a}->{b}": fitted[name, (a, b)][2] for a, b in directions}
    entries.append(entry)
    logging.info("identification %-16s %s", name, "  ".join(
        f"{m} {v['mean']:.3f}" for m, v in metrics.items()))
  results = {
      "target": "subject-id", "task": "classification", "main_metric": "match_accuracy",
      "cv": "session",
      "scheme": "cross-session identification: each non-overlapping window of one session's "
                "scans against every subject's scans of the other session(s) (window features "
                "averaged per scan), both directions; match = highest Pearson correlation, "
                "linear = a classifier trained on the other session's windows; statistics "
                "fitted on the gallery session only; 95% t-interval over subjects",
      "labels_from": f"subject of each recording; sessions from {origin}",
      "sessions": sorted({str(s) for s in rec_session if s is not None}),
      "directions": [f"{a}->{b}" for a, b in directions],
      "n_subjects": len(subjects), "n_samples": int(len(queries)),
      "n_windows": int(keep.sum()), "n_queries": int(len(queries)),
      "n_subjects_left_out": len(by_subject) - len(subjects), "n_folds": len(directions),
      "ci_over": "subjects", "classes": classes,
      "chance": {f"{m}_accuracy": 1.0 / len(subjects) for m in METHODS},
      "feature_sets": entries,
      "seed_summary": clinical.seed_summary(entries, "match_accuracy"),
      "paired_tests": [dict(method=m, **t) for m in METHODS
                       for t in clinical.paired_tests("classification", truth, preds[m],
                                                      groups=q_subject)],
  }
  if results["paired_tests"]:
    results["paired_test"] = results["paired_tests"][0]
  return results


