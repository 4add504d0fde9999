"""Masked reconstruction and forecasting of held-out recordings, model beside simple baselines.

Every window is masked once (masks are a pure function of `(seed, window index)`) and the model
and every baseline predict exactly the same masked tokens, in the checkpoint's robust-scaled
units. Shapes: B windows, P parcels, T patches, L timepoints per patch, W = T * L.

Baselines (pure NumPy, patches [B, P, T, L] + mask [B, P, T] (1 = masked) -> pred [B, P, T, L]):
  train-median        0: robust scaling subtracts the training subjects' per-parcel median.
  parcel-mean         mean of the parcel's visible values in that window.
  interpolation       np.interp in time between the parcel's visible timepoints (flat at the ends).
  nearest-patch       a copy of the parcel's nearest visible patch (ties: the earlier one).
  persistence-value   forecast: the last visible value before the masked patch, repeated.
  persistence-patch   forecast: the last visible patch before the masked patch, copied.
  ar                  forecast: a per-window, per-parcel AR(p) with intercept, least squares on the
                      visible timepoints before the first masked patch, rolled forward.
A parcel with no visible patch in a window (possible with uniform masking) gets 0 (the training
median) from the visible-dependent baselines; those tokens are counted (`fallback_tokens`).

  results = evaluate_checkpoint(WORKDIR, out_dir="out/", mode="parcel")   # evaluate.json/.md/png
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax import masking as masking_lib
from brainlm_jax import metrics as metrics_lib
from brainlm_jax import recordings as recordings_lib
from brainlm_jax import restore
from brainlm_jax.model import BrainLM, ModelConfig

RECONSTRUCTION_BASELINES = ("train-median", "parcel-mean", "interpolation", "nearest-patch")
FORECAST_BASELINES = ("train-median", "parcel-mean", "persistence-value", "persistence-patch", "ar")
SPLITS = ("validation", "all")
DESCRIPTIONS = {
    "model": "the pretrained masked autoencoder",
    "train-median": "0 = the training subjects' per-parcel median (robust scaling subtracts it)",
    "parcel-mean": "mean of the parcel's visible values in the window",
    "interpolation": "linear interpolation in time between the parcel's visible timepoints "
                     "(flat beyond the first/last)",
    "nearest-patch": "copy of the parcel's nearest visible patch (ties: the earlier)",
    "persistence-value": "the last visible value, repeated",
    "persistence-patch": "the last visible patch, copied",
    "ar": "per-window, per-parcel AR({order}) with intercept, least squares on the visible "
          "context, rolled forward",
}


# ----------------------------------------------------------------------------------------------
# Baselines (pure functions).


def _visible(mask: np.ndarray) -> np.ndarray:
  return np.asarray(mask) < 0.5


def no_visible_parcels(mask: np.ndarray) -> np.ndarray:
  """mask [B, P, T] -> bool [B, P]: parcels with no visible patch in the window."""
  return ~_visible(mask).any(-1)


def parcel_mean(patches: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Each parcel's mean visible value in its window, everywhere ([B, P, T, L]; 0 if none)."""
  vis = _visible(mask)[..., None]
  count = vis.sum((-2, -1)) * patches.shape[-1]
  total = np.where(vis, patches, 0.0).sum((-2, -1))
  mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return np.broadcast_to(mean[..., None, None], patches.shape).astype(np.float32)


def interpolation(patches: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Linear interpolation in time through each parcel's visible timepoints; np.interp holds the
  first/last visible value flat beyond them. [B, P, T, L]; 0 for parcels with nothing visible."""
  b, p, t, l = patches.shape
  series = patches.reshape(b * p, t * l)
  vis = np.repeat(_visible(mask).reshape(b * p, t), l, axis=1)
  grid = np.arange(t * l)
  out = np.zeros_like(series, np.float32)
  for i in np.flatnonzero(vis.any(1)):
    out[i] = np.interp(grid, grid[vis[i]], series[i, vis[i]])
  return out.reshape(patches.shape)


def nearest_patch(patches: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Every patch replaced by the parcel's nearest visible patch in time (the earlier on ties;
  a visible patch is its own nearest). [B, P, T, L]; 0 for parcels with nothing visible."""
  t = patches.shape[2]
  dist = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :]).astype(np.float64)  # [T, T]
  dist = np.where(_visible(mask)[..., None, :], dist, np.inf)  # [B, P, T, T(source)]
  src = np.argmin(dist, axis=-1)  # first minimum: the earlier source on ties
  out = np.take_along_axis(patches, src[..., None], axis=2)
  return np.where(no_visible_parcels(mask)[..., None, None], 0.0, out).astype(np.float32)


def _last_visible_before(mask: np.ndarray) -> np.ndarray:
  """mask [B, P, T] -> int [B, P, T]: index of the last visible patch at or before each patch
  (the patch itself when visible), -1 when there is none."""
  t = mask.shape[-1]
  idx = np.where(_visible(mask), np.arange(t), -1)
  return np.maximum.accumulate(idx, axis=-1)


def persistence(patches: np.ndarray, mask: np.ndarray, *, last: str = "value") -> np.ndarray:
  """Each masked patch predicted from the last visible patch before it: its last value repeated
  (last='value') or the patch copied (last='patch'); only masked patches are meaningful.
  [B, P, T, L]; 0 where no visible patch precedes."""
  if last not in ("value", "patch"):
    raise ValueError(f"persistence: last={last!r}; expected 'value' or 'patch'")
  src = _last_visible_before(mask)
  out = np.take_along_axis(patches, np.maximum(src, 0)[..., None], axis=2)
  if last == "value":
    out = np.broadcast_to(out[..., -1:], patches.shape)
  return np.where((src >= 0)[..., None], out, 0.0).astype(np.float32)


def fit_ar(series: np.ndarray, order: int) -> np.ndarray:
  """Least-squares AR(order) with intercept per row: x_t = sum_j a_j x_{t-j} + c.

  series [N, C] -> coefficients float64 [N, order + 1]: (a_1 .. a_order, c). A ridge of 1e-8 of
  the design's mean diagonal keeps constant rows solvable.
  """
  x = np.asarray(series, np.float64)
  n, c = x.shape
  if order < 1:
    raise ValueError(f"AR order must be >= 1, got {order}")
  if c < 2 * order + 2:
    raise ValueError(f"AR({order}) needs at least {2 * order + 2} context timepoints, got {c}")
  lags = np.lib.stride_tricks.sliding_window_view(x, order, axis=1)[:, :c - order, ::-1]
  design = np.concatenate([lags, np.ones((n, c - order, 1))], axis=-1)  # [N, C - p, p + 1]
  y = x[:, order:]
  gram = np.einsum("nki,nkj->nij", design, design)
  ridge = 1e-8 * np.trace(gram, axis1=1, axis2=2)[:, None, None] / (order + 1)
  rhs = np.einsum("nki,nk->ni", design, y)
  return np.linalg.solve(gram + ridge * np.eye(order + 1), rhs[..., None])[..., 0]


def ar_rollout(context: np.ndarray, coef: np.ndarray, steps: int) -> np.ndarray:
  """Rolls AR coefficients [N, p + 1] forward from context [N, C >= p]: float64 [N, steps]."""
  order = coef.shape[1] - 1
  hist = np.asarray(context, np.float64)[:, -order:][:, ::-1].copy()  # lag 1 first
  out = np.empty((context.shape[0], steps))
  for s in range(steps):
    nxt = (hist * coef[:, :order]).sum(1) + coef[:, order]
    out[:, s] = nxt
    hist = np.concatenate([nxt[:, None], hist[:, :-1]], axis=1)
  return out


def autoregressive(patches: np.ndarray, mask: np.ndarray, *, order: int = 5) -> np.ndarray:
  """Forecast masks (a masked suffix of patches per parcel): an AR(order) fitted on each
  window's and parcel's visible prefix, rolled forward over the masked suffix. [B, P, T, L]."""
  b, p, t, l = patches.shape
  vis = _visible(mask)
  first = np.where(vis.all(-1), t, np.argmin(vis, axis=-1))  # first masked patch
  if not (vis == (np.arange(t) < first[..., None])).all():
    raise ValueError("the AR baseline needs forecast masks (a masked suffix of patches)")
  out = np.array(patches, np.float32)
  for k in np.unique(first):  # windows of one masking mode share the split point
    if k == t:
      continue
    sel = first == k
    context = patches[sel][:, :k].reshape(-1, k * l)
    pred = ar_rollout(context, fit_ar(context, order), (t - k) * l)
    out[sel, k:] = pred.reshape(-1, t - k, l)
  return out


def baseline_fns(mode: str, ar_order: int = 5) -> dict[str, Callable]:
  """name -> fn(patches, mask) -> pred, for a masking mode."""
  fns = {"train-median": lambda x, m: np.zeros_like(x, np.float32), "parcel-mean": parcel_mean,
         "interpolation": interpolation, "nearest-patch": nearest_patch,
         "persistence-value": functools.partial(persistence, last="value"),
         "persistence-patch": functools.partial(persistence, last="patch"),
         "ar": functools.partial(autoregressive, order=ar_order)}
  names = FORECAST_BASELINES if mode == "forecast" else RECONSTRUCTION_BASELINES
  return {n: fns[n] for n in names}


# ----------------------------------------------------------------------------------------------
# Model and masks.


@functools.lru_cache(maxsize=8)
def reconstruct_fn(cfg: ModelConfig):
  """jit-ted (params, signal [B, P, W], coords, Masking) -> pred [B, P, T, L] float32."""
  model = BrainLM(cfg)

  def fn(params, signal, coords, masking):
    return model.apply({"params": params}, signal, coords, masking, train=False)[0]

  return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _window_masking_fn(parcels: int, patches: int, mode: str, ratio: float, forecast: int):
  def one(seed, index):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    m = masking_lib.make_masking(key, 1, parcels, patches, mode=mode, ratio=ratio,
                                 forecast_patches=forecast)
    return jax.tree_util.tree_map(lambda a: a[0], m)
  return jax.jit(one)  # one compile per masking, whatever the number of windows


def window_maskings(seed: int, first: int, count: int, parcels: int, patches: int, *,
                    mode: str, ratio: float,
                    forecast_patches: int = 1) -> masking_lib.Masking:
  """Maskings (host arrays) of windows first .. first + count - 1; window i's mask depends only
  on (seed, i): ids_keep [count, K], mask [count, P, T]."""
  fn = _window_masking_fn(parcels, patches, mode, float(ratio), int(forecast_patches))
  per_window = jax.device_get([fn(seed, i) for i in range(first, first + count)])
  return jax.tree_util.tree_map(lambda *a: np.stack(a), *per_window)


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _add(total: dict | None, sums: dict) -> dict:
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return sums if total is None else {k: total[k] + sums[k] for k in total}


def evaluate(pre: restore.Pretrained, recordings: Sequence, *, mode: str, ratio: float,
             forecast_patches: int = 1, seed: int = 0, batch_size: int = 16,
             ar_order: int = 5) -> dict[str, Any]:
  """Scores the model and the mode's baselines on every non-overlapping window of `recordings`.

  Returns a JSON-able dict: `methods` (name, kind, n, mse, r2, per_parcel {mse, r2} [P], and
  `horizon_mse` [forecast_patches * L] for forecasting), token counts, and `example` (arrays of
  the first window for plotting: signal [P, W], mask [P, T], pred per method [P, W]).
  """
  cfg = pre.model_cfg
  window = restore.check_inputs(pre, recordings)
  masking_lib.num_visible(mode, cfg.num_parcels, cfg.num_patches, ratio, forecast_patches)
  fns = {"model": None, **baseline_fns(mode, ar_order)}
  predict = reconstruct_fn(cfg)
  coords = None if pre.coords is None else jnp.asarray(pre.coords)
  sums = dict.fromkeys(fns)
  horizon = dict.fromkeys(fns)
  fallback_tokens = n_windows = 0
  example = None
  for batch in restore.iter_windows(recordings, pre.scaler, window=window, batch_size=batch_size):
    masking = window_maskings(seed, n_windows, batch_size, cfg.num_parcels, cfg.num_patches,
                              mode=mode, ratio=ratio, forecast_patches=forecast_patches)
    model_pred = np.asarray(predict(pre.params, batch.signal, coords, masking))[:batch.n]
    mask = np.asarray(masking.mask)[:batch.n]
    patches = batch.signal[:batch.n].reshape(model_pred.shape)
    fallback_tokens += int(no_visible_parcels(mask).sum()) * cfg.num_patches
    preds = {}
    for name, fn in fns.items():
      preds[name] = model_pred if fn is None else fn(patches, mask)
      sums[name] = _add(sums[name], metrics_lib.masked_sums(preds[name], patches, mask,
                                                            per_parcel=True))
      if mode == "forecast":
        err = np.square(preds[name] - patches)[:, :, -forecast_patches:].sum((0, 1))
        horizon[name] = err.reshape(-1) + (0.0 if horizon[name] is None else horizon[name])
    if example is None:
      example = {"signal": batch.signal[0], "mask": mask[0],
                 "pred": {k: v[0].reshape(cfg.num_parcels, window) for k, v in preds.items()}}
    n_windows += batch.n
  methods = []
  for name in fns:
    overall = metrics_lib.reduce_sums({k: v.sum() for k, v in sums[name].items()})
    per = metrics_lib.reduce_sums(sums[name])
    entry = {"name": name, "kind": "model" if name == "model" else "baseline",
             "description": DESCRIPTIONS[name].format(order=ar_order),
             "n": float(sums[name]["n"].sum()), "mse": overall["mse"], "r2": overall["r2"],
             "per_parcel": {"mse": per["mse"].tolist(), "r2": per["r2"].tolist()}}
    if mode == "forecast":
      entry["horizon_mse"] = (horizon[name] / (n_windows * cfg.num_parcels)).tolist()
    methods.append(entry)
    logging.info("evaluate %-18s masked MSE %.4f  R² %.4f", name, entry["mse"], entry["r2"])
  n_values = float(sums["model"]["n"].sum())
  return {
      "masking": {"mode": mode, "ratio": float(ratio), "forecast_patches": int(forecast_patches),
                  "seed": int(seed)},
      "units": "robust-scaled with the checkpoint's scaler (per-parcel training median and IQR)",
      "num_parcels": cfg.num_parcels, "window": window, "patch_len": cfg.patch_len,
      "n_windows": n_windows, "n_masked_tokens": int(round(n_values / cfg.patch_len)),
      "n_masked_values": int(n_values), "fallback_tokens": fallback_tokens,
      "ar_order": ar_order if mode == "forecast" else None,
      "methods": methods, "example": example,
  }


# ----------------------------------------------------------------------------------------------
# Report.


def _finite(x) -> float:
  return float(x) if x is not None and np.isfinite(x) else float("nan")


def format_table(results: dict) -> str:
  """Markdown: one row per method; lowest MSE / highest R² in bold; per-parcel comparison."""
  methods = results["methods"]
  model = next(m for m in methods if m["kind"] == "model")
  best_mse = min(_finite(m["mse"]) for m in methods)
  best_r2 = max(_finite(m["r2"]) for m in methods)
  lines = ["| method | kind | masked MSE ↓ | R² | median parcel R² | parcels where the model "
           "has lower MSE |", "|---|---|---:|---:|---:|---:|"]
  model_mse = np.asarray(model["per_parcel"]["mse"], np.float64)
  for m in methods:
    mse, r2 = _finite(m["mse"]), _finite(m["r2"])
    cells = [f"{mse:.4f}", f"{r2:.3f}"]
    cells = [f"**{c}**" if v == b else c for c, v, b in zip(cells, (mse, r2), (best_mse, best_r2))]
    parcel_r2 = np.asarray([_finite(v) for v in m["per_parcel"]["r2"]])
    med = np.nanmedian(parcel_r2) if np.isfinite(parcel_r2).any() else float("nan")
    wins = "" if m is model else (
        f"{int((model_mse < np.asarray(m['per_parcel']['mse'])).sum())}/{len(model_mse)}")
    lines.append(f"| {m['name']} | {m['kind']} | " + " | ".join(cells) + f" | {med:.3f} | "
                 f"{wins} |")
  return "\n".join(lines)


def _markdown(results: dict) -> str:
  mk = results["masking"]
  what = (f"forecasting the last {mk['forecast_patches']} patch(es) "
          f"({mk['forecast_patches'] * results['patch_len']} timepoints) of every parcel"
          if mk["mode"] == "forecast" else
          f"masked reconstruction, {mk['mode']} masking at ratio {mk['ratio']:g}")
  ck = results.get("checkpoint", {})
  lines = [f"# Evaluation: {what}", ""]
  if ck:
    lines.append(f"- checkpoint: `{ck['path']}` (step {ck['step']})")
  if results.get("data"):
    lines.append(f"- data: `{results['data']}` ({results.get('split', '')}: "
                 f"{results.get('n_recordings', '?')} recordings, subjects "
                 f"{', '.join(results.get('subjects', []))})")
  lines += [f"- {results['n_windows']} windows of {results['window']} timepoints x "
            f"{results['num_parcels']} parcels; {results['n_masked_tokens']} masked tokens "
            f"({results['n_masked_values']} values), the same for every method; mask seed "
            f"{mk['seed']}",
            f"- units: {results['units']}; R² = 1 - SSE / SS_tot about the mean of the masked "
            "values",
            f"- parcels with no visible patch (baselines fall back to 0): "
            f"{results['fallback_tokens']} tokens", "", format_table(results), "",
            "Baselines:", ""]
  lines += [f"- **{m['name']}**: {m['description']}" for m in results["methods"]
            if m["kind"] != "model"]
  if mk["mode"] == "forecast":
    lines += ["", "MSE by forecast horizon (timepoints after the last visible one):", "",
              "| method | " + " | ".join(f"+{h + 1}" for h in range(
                  len(results["methods"][0]["horizon_mse"]))) + " |",
              "|---|" + "---:|" * len(results["methods"][0]["horizon_mse"])]
    lines += [f"| {m['name']} | " + " | ".join(f"{v:.3f}" for v in m["horizon_mse"]) + " |"
              for m in results["methods"]]
  return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=C0415
  from matplotlib.figure import Figure  # pylint: disable=C0415
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _best_baseline(results: dict) -> dict:
  return min((m for m in results["methods"] if m["kind"] == "baseline"),
             key=lambda m: _finite(m["mse"]))


def plot_traces(results: dict, path: str, parcels: Sequence[int] | None = None) -> None:
  """True vs reconstructed traces of the first window for a few parcels, masked spans shaded."""
  ex = results["example"]
  signal, mask = np.asarray(ex["signal"]), np.asarray(ex["mask"])
  p, w = signal.shape
  l = w // mask.shape[1]
  if parcels is None:
    parcels = np.unique(np.linspace(0, p - 1, min(4, p)).astype(int))
  base = _best_baseline(results)["name"]
  shown = [("model", "model", "#1f77b4"), (base, f"{base} (best baseline)", "#ff7f0e")]
  temporal = next((n for n in ("ar", "interpolation") if n in ex["pred"]), None)
  if temporal not in (None, base):
    shown.append((temporal, temporal, "#2ca02c"))
  fig = _figure(10, 1.9 * len(parcels) + 0.6)
  t = np.arange(w)
  for i, q in enumerate(parcels):
    ax = fig.add_subplot(len(parcels), 1, i + 1)
    masked = np.repeat(mask[q] > 0.5, l)
    for s in np.flatnonzero(mask[q] > 0.5):
      ax.axvspan(s * l - 0.5, (s + 1) * l - 0.5, color="0.88", lw=0)
    ax.plot(t, signal[q], color="black", lw=1.0, label="true")
    for name, label, color in shown:
      ax.plot(t, np.where(masked, ex["pred"][name][q], np.nan), color=color, lw=1.2,
              label=label)
    ax.set_ylabel(f"parcel {q}", fontsize=8)
    ax.tick_params(labelsize=7)
    if i == 0:
      ax.legend(loc="upper right", fontsize=7, ncol=4)
  ax.set_xlabel("timepoint in window (grey: masked patches)", fontsize=8)
  mk = results["masking"]
  fig.suptitle(f"Reconstruction of the first evaluation window ({mk['mode']} masking)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_parcel_r2(results: dict, path: str) -> None:
  """Per-parcel R² of the model (bars) and of the best baseline (dots), by parcel index."""
  model = next(m for m in results["methods"] if m["kind"] == "model")
  base = _best_baseline(results)
  r2 = np.asarray([_finite(v) for v in model["per_parcel"]["r2"]])
  rb = np.asarray([_finite(v) for v in base["per_parcel"]["r2"]])
  fig = _figure(min(4 + 0.09 * len(r2), 24), 3.8)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(r2))
  ax.bar(x, np.nan_to_num(r2), width=0.85, color=np.where(r2 >= rb, "#1f77b4", "#9ecae1"),
         label="model (dark: beats the baseline)")
  ax.plot(x, rb, "o", ms=2.5, color="#ff7f0e", label=f"{base['name']} (best baseline)")
  ax.axhline(0, color="black", lw=0.6)
  ax.set_xlim(-1, len(r2))
  ax.set_xlabel("parcel")
  ax.set_ylabel("R² of masked values")
  ax.set_title(f"Per-parcel R² (model {_finite(model['r2']):.3f} overall, "
               f"{base['name']} {_finite(base['r2']):.3f})", fontsize=10)
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_parcel_r2_brain(results: dict, coords: np.ndarray, path: str) -> None:
  """The model's per-parcel R² as markers at the parcel coordinates (nilearn glass brain)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from nilearn import plotting  # pylint: disable=import-outside-toplevel
  model = next(m for m in results["methods"] if m["kind"] == "model")
  r2 = np.nan_to_num(np.asarray([_finite(v) for v in model["per_parcel"]["r2"]]))
  lim = max(float(np.abs(r2).max()), 1e-3)
  display = plotting.plot_markers(
      r2, np.asarray(coords), node_cmap="RdBu_r", node_vmin=-lim, node_vmax=lim, node_size=12,
      display_mode="lzry", title=f"model per-parcel R² ({results['masking']['mode']})")
  display.savefig(path, dpi=110)
  display.close()


def plot_horizon(results: dict, path: str) -> None:
  """Forecast MSE against the horizon (timepoints after the last visible one), per method."""
  fig = _figure(7, 4)
  ax = fig.add_subplot(1, 1, 1)
  for m in results["methods"]:
    h = np.arange(1, len(m["horizon_mse"]) + 1)
    ax.plot(h, m["horizon_mse"], lw=2.2 if m["kind"] == "model" else 1.2, label=m["name"],
            color="black" if m["kind"] == "model" else None)
  ax.set_xlabel("forecast horizon (timepoints)")
  ax.set_ylabel("MSE (scaled units)")
  ax.set_title("Forecast error by horizon", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_report(results: dict, out_dir: str, coords: np.ndarray | None = None) -> dict[str, str]:
  """Writes evaluate.json (without the plotting example), evaluate.md, traces.png,
  parcel_r2.png, parcel_r2_brain.png (with coordinates) and horizon.png (forecasting)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": "evaluate.json", "md": "evaluate.md", "traces": "traces.png",
           "parcel_r2": "parcel_r2.png"}
  if coords is not None:
    paths["parcel_r2_brain"] = "parcel_r2_brain.png"
  if results["masking"]["mode"] == "forecast":
    paths["horizon"] = "horizon.png"
  paths = {k: os.path.join(out_dir, v) for k, v in paths.items()}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(_jsonable({k: v for k, v in results.items() if k != "example"}), f, indent=1)
    f.write("\n")
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(_markdown(results))
  plot_traces(results, paths["traces"])
  plot_parcel_r2(results, paths["parcel_r2"])
  if coords is not None:
    plot_parcel_r2_brain(results, coords, paths["parcel_r2_brain"])
  if "horizon" in paths:
    plot_horizon(results, paths["horizon"])
  return paths


# ----------------------------------------------------------------------------------------------
# The whole job.


def select_recordings(pre: restore.Pretrained, data: str | None, split: str | None):
  """The recordings to evaluate: the checkpoint's held-out (validation) subjects of its data.path
  by default; with `data`, every recording there (split='all'). Returns (recs, skipped, data,
  split)."""
  split = split or ("all" if data else "validation")
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  data_cfg = pre.config.get("data", {})
  source = "--data" if data else f"the checkpoint's data.path ({pre.path})"
  data = data or data_cfg.get("path")
  if not data:
    raise ValueError(f"no --data given and the checkpoint {pre.path} stores no data.path")
  if isinstance(data, str) and not os.path.exists(data) and not any(c in data for c in "*?["):
    raise FileNotFoundError(f"{data}: data not found (from {source}; pass --data DIR)")
  recs, skipped = recordings_lib.load_recordings(
      data, window=pre.model_cfg.window,
      subject_pattern=data_cfg.get("subject_pattern") or recordings_lib.DEFAULT_SUBJECT_PATTERN)
  if recs[0].num_parcels != pre.model_cfg.num_parcels:
    raise ValueError(f"{data}: recordings have {recs[0].num_parcels} parcels, but the checkpoint "
                     f"{pre.path} was pretrained on {pre.model_cfg.num_parcels}")
  if split == "validation":
    held_out = set(pre.subjects.get("validation", []))
    if not held_out:
      raise ValueError(f"{pre.path}: the checkpoint lists no validation subjects; use --split all")
    recs = [r for r in recs if r.subject in held_out]
    if not recs:
      raise ValueError(f"{data}: none of the checkpoint's validation subjects "
                       f"{sorted(held_out)} is there; use --split all for another cohort")
  return recs, skipped, str(data), split


def evaluate_checkpoint(checkpoint: str, *, out_dir: str, data: str | None = None,
                        split: str | None = None, mode: str | None = None,
                        ratio: float | None = None, forecast_patches: int | None = None,
                        seed: int = 0, batch_size: int = 16, ar_order: int = 5,
                        step: int | None = None) -> dict[str, Any]:
  """load_pretrained -> recordings -> evaluate -> write_report. Masking defaults to the
  checkpoint's (mode, ratio, forecast_patches). Returns the results (with 'report' paths)."""
  pre = restore.load_pretrained(checkpoint, step=step)
  mask_cfg = pre.config.get("masking", {})
  mode = mode or mask_cfg.get("mode", "parcel")
  ratio = mask_cfg.get("ratio", 0.75) if ratio is None else ratio
  forecast_patches = forecast_patches or mask_cfg.get("forecast_patches", 1)
  if mode not in masking_lib.MODES:
    raise ValueError(f"mode={mode!r}; expected one of {masking_lib.MODES}")
  masking_lib.num_visible(mode, 1, pre.model_cfg.num_patches, ratio, forecast_patches)
  recs, skipped, data, split = select_recordings(pre, data, split)
  logging.info("Evaluating %s (step %d) on %d recordings (%s of %s), %s masking", pre.path,
               pre.step, len(recs), split, data, mode)
  results = evaluate(pre, recs, mode=mode, ratio=ratio, forecast_patches=forecast_patches,
                     seed=seed, batch_size=batch_size, ar_order=ar_order)
  results.update(checkpoint={"path": pre.path, "step": pre.step}, data=data, split=split,
                 n_recordings=len(recs), subjects=sorted({r.subject for r in recs}),
                 recordings=[r.path for r in recs], skipped_recordings=skipped)
  results["report"] = write_report(results, out_dir, pre.coords)
  return results
