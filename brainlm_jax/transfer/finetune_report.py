"""The report of a cross-validated fine-tuning job (transfer/finetune_cv.py): per-site scores,
the spread over runs, a permutation null for regression, markdown."""

from __future__ import annotations

import numpy as np

from brainlm_jax.transfer import labels
from brainlm_jax.transfer import report

PERMUTATIONS = 1000


def permutation_p(y: np.ndarray, pred: np.ndarray, splits, seed: int,
                  n: int = PERMUTATIONS) -> float:
  """One-sided p of the pooled Pearson r of (pred, y) against labels permuted within each test
  fold (the predictions are fixed: each came from a model that never saw its label)."""
  r = np.corrcoef(pred, y)[0, 1]
  rng = np.random.default_rng(seed)
  hits = 0
  for _ in range(n):
    perm = y.copy()
    for _, te, _ in splits:
      perm[te] = rng.permutation(y[te])
    hits += np.corrcoef(pred, perm)[0, 1] >= r
  return float((1 + hits) / (1 + n))


def per_site(kind: str, y, pred, proba, classes, sites) -> dict[str, dict]:
  """Each site's scores, from the pooled test predictions of its subjects."""
  out = {}
  with np.errstate(all="ignore"):
    for site in sorted(set(sites.tolist())):
      at = sites == site
      out[site] = labels.score(kind, y[at], pred[at], None if proba is None else proba[at],
                               classes)
  return out


def spread(values: list[float]) -> dict:
  if not values:
    return {}
  return {"values": values, "mean": float(np.mean(values)), "min": float(np.min(values)),
          "max": float(np.max(values))}


def format_report(results: dict) -> str:
  """Markdown: per strategy the pretrained runs against the random inits; every row; tests."""
  m = results["main_metric"]
  lines = [f"# Fine-tuning under cross-validation: `{results['target']}` ({results['task']})", "",
           f"- {results['n_subjects']} subjects, {len(results['folds'])} folds: "
           f"{results['scheme']}",
           f"- labels from {results['labels_from']}",
           f"- inits: " + ", ".join(f"{i['label']}" + (f" (`{i['path']}`, step {i['step']})"
                                                       if i["path"] else "")
                                    for i in results["inits"]),
           f"- fine-tuning seeds {results['seeds']}; poolings {results['poolings']}; "
           f"{results['seconds'] / 60:.1f} min", "",
           f"| strategy | {m}: pretrained mean [min, max] | random init |", "|---|---|---|"]
  for s in results["strategies"]:
    cells = [f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" if v else "-"
             for v in (s["pretrained"], s["random-init"])]
    lines.append(f"| {s['strategy']} | {cells[0]} | {cells[1]} |")
  lines += ["", report.metric_table(results["rows"], list(labels.METRICS[results["task"]]),
                                    chance=results.get("chance")), ""]
  for t in results.get("paired_tests", []):
    lines.append(f"- {t['a']} vs {t['b']}: {t['test']}, p = {t['p_value']:.3g}")
  if results["task"] == "regression":
    lines += [""] + [f"- `{r['name']}`: permutation p of the pooled r = {r['permutation_p']:.3g}"
                     for r in results["rows"] if "permutation_p" in r]
  return "\n".join(lines) + "\n"
