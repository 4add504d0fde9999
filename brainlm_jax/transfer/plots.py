"""Every figure of the transfer jobs, drawn on an Agg canvas (no pyplot state, no window).

  plot_scores           a probe's main metric per feature set, with 95% intervals and chance
  plot_traces           true vs predicted time series of one window, masked values shaded
  plot_parcel_map       per-parcel values on a glass brain (or a bar plot without coordinates)
  plot_parcel_r2        per-parcel R² of the model against the best baseline
  plot_horizon          forecast error by horizon
  plot_network_attention, plot_embedding_pca, plot_training_curves   brainlm-visualize's
  write_tensorboard_images                                           PNGs into TensorBoard
Each takes the arrays it draws and the PNG path, and returns the path.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from brainlm_jax.data.phenotypes import as_float
from brainlm_jax.training import storage
from brainlm_jax.transfer.labels import sorted_classes

__all__ = ["figure", "plot_embedding_pca", "plot_horizon", "plot_network_attention",
           "plot_parcel_map", "plot_parcel_r2", "plot_scores", "plot_traces",
           "plot_training_curves", "save", "write_tensorboard_images"]


def figure(width: float, height: float):
  """A matplotlib Figure on its own Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=C0415
  from matplotlib.figure import Figure  # pylint: disable=C0415
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def save(fig, path: str, dpi: int = 110) -> str:
  """Writes `fig` to `path` (its extension names the format), local or in a bucket (gs://)."""
  if storage.is_local(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
  storage.makedirs(storage.dirname(path))
  with storage.open_file(path, "wb") as f:
    fig.savefig(f, dpi=dpi, format=os.path.splitext(path)[1][1:] or "png")
  return path


def _num(x) -> float:
  return float("nan") if x is None else float(x)


def plot_scores(rows: Sequence[dict], metric: str, path: str, *, chance: float | None,
                title: str, ylabel: str) -> str:
  """Bars of `metric` per row (`rows`: name, source, metrics {metric: {'mean', 'ci95'}}) with
  their 95% intervals, coloured by source, and the chance level."""
  colors = {"model": "#1f77b4", "random-init": "#9a9a9a", "fc": "#ff7f0e"}
  means = np.asarray([_num(r["metrics"][metric]["mean"]) for r in rows])
  lo = np.asarray([_num(r["metrics"][metric]["ci95"][0]) for r in rows])
  hi = np.asarray([_num(r["metrics"][metric]["ci95"][1]) for r in rows])
  err = np.nan_to_num(np.stack([means - lo, hi - means]), nan=0.0)  # [2, rows]: no CI -> no bar
  fig = figure(1.3 * len(rows) + 2.5, 4.0)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(rows))
  ax.bar(x, np.nan_to_num(means), yerr=err, capsize=5,
         color=[colors.get(r["source"], "#2ca02c") for r in rows], edgecolor="black",
         linewidth=0.6)
  for xi, v, top in zip(x, means, np.where(np.isfinite(hi), np.fmax(hi, means), means)):
    if np.isfinite(v):  # above the upper whisker, clear of the error bar
      ax.annotate(f"{v:.2f}", (xi, top), textcoords="offset points", xytext=(0, 3),
                  ha="center", va="bottom", fontsize=8)
  if chance is not None:
    ax.axhline(chance, color="red", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.legend(loc="best", fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels([r["name"] if r["name"] == r["source"] else f"{r['name']}\n({r['source']})"
                      for r in rows], fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  if metric in ("accuracy", "balanced_accuracy", "roc_auc"):
    ax.set_ylim(0, 1.12)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return save(fig, path, dpi=120)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
  """[start, stop) of each run of True in a 1-D bool array."""
  padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[0::2], edges[1::2]))


def plot_traces(signal: np.ndarray, mask: np.ndarray, preds: Sequence[tuple[str, np.ndarray, str]],
                parcels: Sequence[int], path: str, *, names: Sequence[str] | None = None,
                tr: float | None = None, r2: np.ndarray | None = None, title: str = "") -> str:
  """True vs predicted time series of one window for `parcels`: signal [P, W] in black, the
  masked values (mask [P, W] > 0.5) shaded, each prediction (label, pred [P, W], colour) drawn
  on the masked values only (what the loss sees)."""
  signal, mask = np.asarray(signal), np.asarray(mask) > 0.5
  w = signal.shape[1]
  step = tr or 1.0
  x = np.arange(w) * step
  fig = figure(10, 1.9 * len(parcels) + 0.8)
  for row, p in enumerate(parcels):
    ax = fig.add_subplot(len(parcels), 1, row + 1)
    for a, b in _runs(mask[p]):
      ax.axvspan(x[a] - step / 2, x[b - 1] + step / 2, color="0.88", lw=0)
    ax.plot(x, signal[p], color="black", lw=1.1, label="true (scaled)")
    for label, pred, colour in preds:
      ax.plot(x, np.where(mask[p], np.asarray(pred)[p], np.nan), color=colour, lw=1.3,
              label=label)
    name = names[p] if names is not None else f"parcel {p}"
    ax.set_title(name + (f"  (R² {r2[p]:.2f} over all windows)" if r2 is not None else ""),
                 fontsize=9, loc="left")
    ax.set_ylabel("signal", fontsize=8)
    ax.tick_params(labelsize=8)
    if row == 0:
      ax.legend(loc="upper right", fontsize=7, ncol=len(preds) + 1, framealpha=0.8)
  ax.set_xlabel("time (s)" if tr else "time (timepoints)", fontsize=9)
  fig.suptitle(title or "True vs predicted (grey: masked values)", fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def plot_parcel_r2(model_r2: np.ndarray, baseline_r2: np.ndarray, baseline: str, path: str, *,
                   title: str) -> str:
  """Per-parcel R² of the model (bars, dark where it beats the baseline) and of the best
  baseline (dots), by parcel index."""
  r2, rb = np.asarray(model_r2, np.float64), np.asarray(baseline_r2, np.float64)
  fig = figure(min(4 + 0.09 * len(r2), 24), 3.8)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(r2))
  ax.bar(x, np.nan_to_num(r2), width=0.85, color=np.where(r2 >= rb, "#1f77b4", "#9ecae1"),
         label="model (dark: beats the baseline)")
  ax.plot(x, rb, "o", ms=2.5, color="#ff7f0e", label=f"{baseline} (best baseline)")
  ax.axhline(0, color="black", lw=0.6)
  ax.set_xlim(-1, len(r2))
  ax.set_xlabel("parcel")
  ax.set_ylabel("R² of masked values")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return save(fig, path)


def plot_horizon(curves: Sequence[tuple[str, np.ndarray, bool]], path: str) -> str:
  """Forecast MSE against the horizon (timepoints after the last visible one); curves:
  (name, mse per horizon, is the model)."""
  fig = figure(7, 4)
  ax = fig.add_subplot(1, 1, 1)
  for name, mse, is_model in curves:
    h = np.arange(1, len(mse) + 1)
    ax.plot(h, mse, lw=2.2 if is_model else 1.2, label=name, color="black" if is_model else None)
  ax.set_xlabel("forecast horizon (timepoints)")
  ax.set_ylabel("MSE (scaled units)")
  ax.set_title("Forecast error by horizon", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return save(fig, path)


def plot_parcel_map(values: np.ndarray, coords: np.ndarray | None, path: str, *, title: str,
                    label: str, cmap: str = "viridis", vmin: float | None = None,
                    vmax: float | None = None, names: Sequence[str] | None = None) -> str:
  """Per-parcel values as a brain map: nilearn glass-brain markers at `coords` [P, 3] (MNI mm);
  without coordinates a per-parcel bar plot, titled as such."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  if vmin is None:
    vmin = float(np.percentile(finite, 2)) if finite.size else 0.0
  if vmax is None:
    vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
  if vmax <= vmin:
    vmax = vmin + 1e-6
  import matplotlib  # pylint: disable=import-outside-toplevel
  if coords is not None:
    from nilearn import plotting  # pylint: disable=import-outside-toplevel
    fig = figure(11, 3.8)
    shown = np.where(np.isfinite(values), values, vmin)
    size = 30.0 if len(values) < 150 else 14.0
    plotting.plot_markers(np.clip(shown, vmin, vmax), np.asarray(coords), node_size=size,
                          node_cmap=cmap, node_vmin=vmin, node_vmax=vmax, display_mode="lyrz",
                          figure=fig, axes=(0.0, 0.0, 0.9, 0.9), title=None, alpha=0.9,
                          colorbar=False)
    bar = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(vmin, vmax), cmap)
    fig.colorbar(bar, cax=fig.add_axes([0.915, 0.12, 0.013, 0.72]), label=label)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)
  p = len(values)
  fig = figure(max(8.0, min(0.09 * p + 2, 20)), 4.0)
  ax = fig.add_subplot(1, 1, 1)
  norm = matplotlib.colors.Normalize(vmin, vmax)
  ax.bar(np.arange(p), np.nan_to_num(values), color=matplotlib.colormaps[cmap](norm(values)),
         width=0.85)
  ax.set_xlim(-1, p)
  ax.set_xlabel("parcel index (no coordinates: pass --coords for a glass-brain map)", fontsize=9)
  ax.set_ylabel(label, fontsize=9)
  ax.axhline(0, color="black", lw=0.6)
  ax.grid(axis="y", alpha=0.3)
  if names is not None and p <= 40:
    ax.set_xticks(np.arange(p))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
  ax.set_title(f"{title}\n(per-parcel plot: no parcel coordinates)", fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def plot_network_attention(groups: Sequence[tuple[str, np.ndarray]], path: str, *,
                           title: str) -> str:
  """CLS attention share per parcel grouped by network (groups: [(network, its parcels'
  values)]): a box per network with its parcels as points, and the network's total share."""
  values = np.concatenate([g for _, g in groups])
  total = float(np.sum(values))
  fig = figure(max(6.0, 1.1 * len(groups) + 2), 4.4)
  ax = fig.add_subplot(1, 1, 1)
  ax.boxplot([g for _, g in groups], positions=np.arange(len(groups)), widths=0.6,
             showfliers=False)
  rng = np.random.default_rng(0)
  for i, (_, g) in enumerate(groups):
    ax.scatter(i + rng.uniform(-0.18, 0.18, len(g)), g, s=10, alpha=0.6, color="tab:blue")
  uniform = 1.0 / len(values)
  ax.axhline(uniform, color="red", ls="--", lw=1, label=f"uniform (1/{len(values)})")
  ax.set_xticks(np.arange(len(groups)))
  ax.set_xticklabels([f"{n}\n{len(g)} parcels\n{100 * g.sum() / total:.1f}% total"
                      for n, g in groups], fontsize=8)
  ax.set_ylabel("CLS attention share per parcel", fontsize=9)
  ax.legend(fontsize=8, loc="upper right")
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def _colours(values: list[str]):
  """Labels -> (float values, True) when numeric with > 4 distinct values (a colour scale), else
  (category ids, False) (a legend)."""
  nums = [as_float(v) for v in values]
  if nums and all(v is not None for v in nums) and len(set(nums)) > 4:
    return np.asarray(nums), True
  cats = sorted_classes(values)
  return np.asarray([cats.index(v) for v in values]), False


def plot_embedding_pca(pcas: dict, path: str, *,
                       colour_by: dict[str, str] | None = None, colour_name: str = "subject",
                       title: str = "") -> str:
  """One panel per embedding kind ('mean', 'cls'): windows (small) and subject means (large,
  outlined) on the first two PCs, coloured by a phenotype {subject: value} or by subject."""
  fig = figure(5.2 * len(pcas) + 1.4, 4.8)
  first = next(iter(pcas.values()))
  has = [s for s in first.subjects if colour_by is None or s in colour_by]
  if colour_by is not None and not has:
    raise ValueError(f"no subject of the data has a {colour_name!r} value (subjects: "
                     f"{first.subjects[:5]}...)")
  labels = [s if colour_by is None else colour_by[s] for s in has]
  cvals, numeric = _colours(labels)
  import matplotlib  # pylint: disable=import-outside-toplevel
  cmap = matplotlib.colormaps["viridis" if numeric else "tab10" if len(set(labels)) <= 10
                              else "tab20"]
  if numeric:
    norm = matplotlib.colors.Normalize(cvals.min(), cvals.max() if cvals.max() > cvals.min()
                                       else cvals.min() + 1)
    colour_of = {s: cmap(norm(v)) for s, v in zip(has, cvals)}
  else:
    colour_of = {s: cmap(int(v) % cmap.N) for s, v in zip(has, cvals)}
  for i, (kind, pc) in enumerate(pcas.items()):
    ax = fig.add_subplot(1, len(pcas), i + 1)
    for s, xy in zip(pc.subjects, pc.means):
      if s not in colour_of:
        continue
      win = pc.windows[pc.window_subject == s]
      ax.scatter(win[:, 0], win[:, 1], s=12, alpha=0.35, color=colour_of[s], lw=0)
      ax.scatter(xy[0], xy[1], s=110, color=colour_of[s], edgecolor="black", lw=1.0, zorder=3)
    ax.set_xlabel(f"PC1 ({100 * pc.explained[0]:.0f}% var)", fontsize=9)
    ax.set_ylabel(f"PC2 ({100 * pc.explained[1]:.0f}% var)", fontsize=9)
    ax.set_title(f"{kind} embedding (PCA fit on {pc.fit_on})", fontsize=9)
    ax.grid(alpha=0.3)
  if numeric:
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, cax=fig.add_axes([0.895, 0.15, 0.015, 0.68]), label=colour_name)
  else:
    from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
    seen = dict.fromkeys(labels)
    handles = [Line2D([], [], marker="o", ls="", markersize=7, markeredgecolor="black",
                      color=cmap(int(cvals[labels.index(l)]) % cmap.N), label=l) for l in seen]
    fig.legend(handles=handles, title=colour_name, fontsize=7, title_fontsize=8,
               loc="center left", bbox_to_anchor=(0.88, 0.5))
  fig.suptitle(title or "Subject embeddings: large = subject mean, small = windows", fontsize=10)
  fig.subplots_adjust(left=0.07, right=0.86, top=0.86, bottom=0.12, wspace=0.28)
  return save(fig, path)


def plot_training_curves(metrics: dict[str, tuple[np.ndarray, np.ndarray]], path: str, *,
                         title: str = "Training curves") -> str:
  """Masked MSE (train and eval) and eval R² against step; grad norm when logged."""
  panels = [("masked MSE", [("train_loss", "train (masked MSE)", "tab:blue"),
                            ("eval_loss", "eval (validation)", "tab:orange")]),
            ("eval R² (masked patches)", [("eval_r2", "eval R²", "tab:green")]),
            ("gradient norm", [("grad_norm", "grad norm (before clipping)", "tab:gray")])]
  panels = [(y, [c for c in curves if c[0] in metrics]) for y, curves in panels]
  panels = [(y, curves) for y, curves in panels if curves]
  if not panels:
    raise ValueError(f"no train_loss / eval_loss / eval_r2 in the metrics (have {sorted(metrics)})")
  fig = figure(4.6 * len(panels), 3.8)
  for i, (ylabel, curves) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for key, lab, colour in curves:
      steps, vals = metrics[key]
      ax.plot(steps, vals, marker="o" if len(steps) <= 30 else None, ms=3, color=colour, label=lab)
    if ylabel.startswith("eval R²"):
      ax.axhline(0, color="black", lw=0.6, ls=":")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def write_tensorboard_images(pngs: dict[str, str], logdir: str, step: int) -> str:
  """Writes each PNG as an image summary (tag = its name) at `step` into `logdir`."""
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from matplotlib import image as mpimg  # pylint: disable=import-outside-toplevel
  images = {}
  for name, p in pngs.items():
    with storage.open_file(p, "rb") as f:  # local or gs://
      img = mpimg.imread(f, format="png")  # float [H, W, 3|4] in [0, 1]
    images[name] = (np.clip(img[..., :3], 0, 1) * 255).round().astype(np.uint8)[None]
  writer = metric_writers.SummaryWriter(logdir)
  try:
    writer.write_images(int(step), images)
    writer.flush()
  finally:
    writer.close()
  return logdir
