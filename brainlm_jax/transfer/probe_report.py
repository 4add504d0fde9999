"""The linear probe's report: probe.json, probe.md (tables of every row, the paired tests, the
spread over pretraining runs and random-init seeds, per held-out site) and probe.png.

  paths = write_report(results, out_dir)   # {'json', 'md', 'png'}
  print(format_table(results))
"""

from __future__ import annotations

from brainlm_jax.transfer import plots
from brainlm_jax.transfer import report


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
  for other in results.get("other_checkpoints", []):
    head.append(f"- more pretraining runs: `{other['path']}` (step {other['step']}): rows `@2`, "
                "`@3`, ... in order")
  tests = results.get("paired_tests") or ([results["paired_test"]] if results.get("paired_test")
                                          else [])
  tail = [_seed_table(results)] if any(
      len(r.get(s, {}).get("values", ())) > 1 for r in results.get("seed_summary", ())
      for s in ("model", "random-init")) else []
  units = ("subjects (each one's share of queries right)" if results.get("cv") == "session" else
           "subjects (each one's share of test windows right)"
           if results["target"] == "subject-id" else "subjects")

  def counts(t):
    if "subjects_a_better" in t:
      return f"; subjects better with a / b: {t['subjects_a_better']} / {t['subjects_b_better']}"
    if "only_a_right" in t:
      return f"; only a right / only b right: {t['only_a_right']} / {t['only_b_right']}"
    return ""
  tail += [f"Paired tests on the same {units}:\n\n" + "\n".join(
      f"- {t.get('method', '') + ': ' if t.get('method') else ''}`{t['a']}` vs `{t['b']}` "
      f"({t['test']}): p = {t['p_value']:.3g}{counts(t)}" for t in tests)] if tests else []
  tail += [_per_site_table(results)] if results.get("cv") == "site" else []
  return ("\n".join(head) + "\n\n" + format_table(results) + "\n"
          + "".join(f"\n{t}\n" for t in tail))


def _seed_table(results: dict) -> str:
  """Main metric of each reading over the pretraining runs and over the random-init seeds."""
  m = results["main_metric"]

  def cell(g):
    if not g:
      return ""
    return (f"{g['mean']:.3f} [{g['min']:.3f}, {g['max']:.3f}] ({len(g['values'])})"
            if len(g["values"]) > 1 else f"{g['mean']:.3f}")
  lines = ["| reading | pretrained: mean [min, max] (runs) | random init: mean [min, max] "
           "(seeds) |", "|---|---:|---:|"]
  lines += [f"| {r['reading']} | {cell(r.get('model'))} | {cell(r.get('random-init'))} |"
            for r in results["seed_summary"]]
  return f"{m} over pretraining runs and random-init seeds:\n\n" + "\n".join(lines)


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
