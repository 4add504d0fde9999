"""The one report writer of every transfer job: NAME.json (everything), NAME.md (a header and a
table) and figures, all in one output directory.

  paths = write_report(results, out_dir, "probe", markdown,
                       figures={"png": ("probe.png", plot_fn)})
  table = metric_table(rows, metrics, chance=...)     one row per model / baseline

Rows are dicts with identity fields (name, source, dim, ...) and `metrics`: {metric: {'mean',
'ci95': [low, high]}} (`labels.summary` / `labels.point`); the best value of each metric is in
bold, metrics where lower is better are marked with an arrow.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np

from brainlm_jax.training import storage
from brainlm_jax.transfer.labels import LOWER_IS_BETTER

__all__ = ["fmt_score", "jsonable", "metric_table", "write_report"]


def jsonable(x: Any) -> Any:
  """`x` with numpy scalars/arrays as Python numbers/lists and NaN/inf as None."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def _finite(x) -> bool:
  return x is not None and np.isfinite(x)


def fmt_score(m: dict, digits: int = 3) -> str:
  """'mean ± half-width' of a summary ('mean' alone without an interval; 'n/a' if missing)."""
  mean, (lo, hi) = m.get("mean"), m.get("ci95", (None, None))
  if not _finite(mean):
    return "n/a"
  if not (_finite(lo) and _finite(hi)):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def metric_table(rows: Sequence[dict], metrics: Sequence[str], *,
                 columns: Sequence[tuple[str, str]] = (("name", "features"),
                                                       ("source", "source"), ("dim", "dim")),
                 labels: dict[str, str] | None = None,
                 fmt: dict[str, Callable[[dict], str]] | None = None,
                 chance: dict[str, float] | None = None, chance_label: str = "*chance*",
                 bold: Sequence[str] | None = None) -> str:
  """Markdown: one line per row (`columns`: (key, header) of its identity cells), one column per
  metric (`labels`: headers; `fmt`: per-metric cell format, default `fmt_score`), the best mean
  of each metric in `bold` (default: all) in bold, and a last `chance` line."""
  labels, fmt = labels or {}, fmt or {}
  bold = metrics if bold is None else bold
  best = {}
  for m in bold:
    means = [r["metrics"][m]["mean"] for r in rows if m in r["metrics"]
             and _finite(r["metrics"][m].get("mean"))]
    if means:
      best[m] = (min if m in LOWER_IS_BETTER else max)(means)
  head = [h for _, h in columns] + [labels.get(m, m) + (" ↓" if m in LOWER_IS_BETTER else "")
                                    for m in metrics]
  align = ["---:" if key == "dim" else "---" for key, _ in columns] + ["---:"] * len(metrics)
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
  for r in rows:
    cells = [str(r.get(key, "")) for key, _ in columns]
    for m in metrics:
      value = r["metrics"].get(m)
      s = "n/a" if value is None else fmt.get(m, fmt_score)(value)
      if m in best and value is not None and value.get("mean") == best[m]:
        s = f"**{s}**"
      cells.append(s)
    lines.append("| " + " | ".join(cells) + " |")
  if chance:
    lines.append(f"| {chance_label} |" + " |" * (len(columns) - 1) + " " + " | ".join(
        f"*{chance[m]:.3f}*" if m in chance else "" for m in metrics) + " |")
  return "\n".join(lines)


def write_report(results: dict, out_dir: str, name: str, markdown: str, *,
                 figures: dict[str, tuple[str, Callable[[str], Any]]] | None = None,
                 exclude: Sequence[str] = ()) -> dict[str, str]:
  """Writes OUT/NAME.json (`results` without the `exclude` keys), OUT/NAME.md (`markdown`) and
  each figure of `figures` {key: (file name, draw(path))}. Returns {'json', 'md', figure key:
  path}. OUT may be a bucket (gs://: `training.storage`)."""
  storage.makedirs(out_dir)
  paths = {"json": storage.join(out_dir, f"{name}.json"),
           "md": storage.join(out_dir, f"{name}.md")}
  storage.write_text(paths["json"], json.dumps(
      jsonable({k: v for k, v in results.items() if k not in exclude}), indent=1) + "\n")
  storage.write_text(paths["md"], markdown if markdown.endswith("\n") else markdown + "\n")
  for key, (file_name, draw) in (figures or {}).items():
    paths[key] = storage.join(out_dir, file_name)
    draw(paths[key])
  return paths
