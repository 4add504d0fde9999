"""Masked reconstruction and forecasting of held-out recordings, model beside simple baselines.

Every window is masked once (masks are a pure function of `(seed, window index)`, so results do
not depend on the batch size) and the model and every baseline (`baselines.py`) predict exactly
the same masked values, in the checkpoint's robust-scaled units. Each variant reconstructs in
the signal's own layout (`functions.reconstruct_fn`); for variants whose tokens are not time
patches of one parcel (vitmae_image) only the value baselines are scored.

  passes = reconstruction_pass(pre, recordings, mode="parcel", ratio=0.5)  # sums, one example
  results = evaluate(pre, recordings, mode="parcel", ratio=0.5)            # the table's numbers
  results = Evaluate(mode="forecast").run(pre, "out/")        # + evaluate.json/.md and figures
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import jax.numpy as jnp
import numpy as np

from brainlm_jax.data.windows import iter_windows
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models import token_grid, tokens_are_parcel_patches
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.transfer import baselines as baselines_lib
from brainlm_jax.transfer import functions
from brainlm_jax.transfer import labels
from brainlm_jax.transfer import plots
from brainlm_jax.transfer import report
from brainlm_jax.transfer.run import Evaluator, Pretrained, check_inputs


def _add(total: dict | None, sums: dict) -> dict:
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return sums if total is None else {k: total[k] + sums[k] for k in total}


@dataclasses.dataclass
class Pass:
  """One pass over the windows. sums: method -> per-parcel masked sums {n, sse, sy, syy} [P];
  horizon: method -> summed squared error per forecast horizon (forecasting); example: the first
  window {signal [P, W], mask [P, W], pred {method: [P, W]}, recording, window}; n_windows;
  masked_tokens; fallback_tokens (parcels with nothing visible x their tokens)."""
  sums: dict
  horizon: dict
  example: dict
  n_windows: int
  masked_tokens: int
  fallback_tokens: int


def reconstruction_pass(pre: Pretrained, recordings: Sequence, *, mode: str, ratio: float,
                        forecast_patches: int = 1, seed: int = 0, batch_size: int = 16,
                        ar_order: int = 5, with_baselines: bool = True,
                        max_windows: int | None = None) -> Pass:
  """Masks every non-overlapping window of `recordings` (up to `max_windows`) and scores the
  model's reconstruction (and the mode's baselines) on the masked values."""
  cfg = pre.model_cfg
  window = check_inputs(pre, recordings)
  grid = token_grid(cfg)
  by_patch = tokens_are_parcel_patches(cfg)
  if mode == "forecast" and not by_patch:
    raise ValueError(f"{pre.path}: forecast masking needs a parcels x time-patches model; this "
                     f"{cfg.variant} checkpoint masks patches of an image")
  masking_lib.num_visible(mode, *grid, ratio, forecast_patches)  # validates the masking
  fns = {"model": None}
  if with_baselines:
    fns.update(baselines_lib.baseline_fns(mode, ar_order, values_only=not by_patch))
  predict = functions.reconstruct_fn(cfg)
  coords = None if pre.coords is None else jnp.asarray(pre.coords)
  sums, horizon = dict.fromkeys(fns), dict.fromkeys(fns)
  p = cfg.num_parcels
  shape = (p, cfg.num_patches, cfg.patch_len) if by_patch else (p, window, 1)
  n_windows = masked_tokens = fallback = 0
  example = None
  for batch in iter_windows(recordings, pre.scaler, window=window, batch_size=batch_size,
                            max_windows=max_windows):
    masking = functions.window_maskings(seed, n_windows, batch_size, grid, mode=mode,
                                        ratio=ratio, forecast_patches=forecast_patches)
    pred, value_mask = (np.asarray(a)[:batch.n] for a in
                        predict(pre.params, batch.signal, coords, masking))
    token_mask = np.asarray(masking.mask)[:batch.n]
    mask = token_mask if by_patch else value_mask  # [B, P, T] (or [B, P, W] per value)
    patches = batch.signal[:batch.n].reshape(batch.n, *shape)
    masked_tokens += int(token_mask.sum())
    fallback += int(baselines_lib.no_visible_parcels(mask).sum()) * shape[1]
    preds = {}
    for name, fn in fns.items():
      preds[name] = pred.reshape(patches.shape) if fn is None else fn(patches, mask)
      sums[name] = _add(sums[name], metrics_lib.masked_sums(preds[name], patches, mask,
                                                            live=batch.live[:batch.n],
                                                            per_parcel=True))
      if mode == "forecast":
        err = np.square(preds[name] - patches)[:, :, -forecast_patches:].sum((0, 1))
        horizon[name] = err.reshape(-1) + (0.0 if horizon[name] is None else horizon[name])
    if example is None:
      example = {"signal": batch.signal[0], "mask": value_mask[0],
                 "pred": {k: v[0].reshape(p, window) for k, v in preds.items()},
                 "recording": int(batch.recording[0]), "window": int(batch.window[0])}
    n_windows += batch.n
  return Pass(sums, horizon, example, n_windows, masked_tokens, fallback)


def evaluate(pre: Pretrained, recordings: Sequence, *, mode: str, ratio: float,
             forecast_patches: int = 1, seed: int = 0, batch_size: int = 16,
             ar_order: int = 5) -> dict[str, Any]:
  """Scores the model and the mode's baselines on every non-overlapping window of `recordings`.

  Returns a JSON-able dict: `methods` (name, kind, n, mse, r2, per_parcel {mse, r2} [P], and
  `horizon_mse` [forecast_patches * L] for forecasting), token counts, and `example` (arrays of
  the first window for plotting: signal [P, W], mask [P, W], pred per method [P, W]).
  """
  cfg = pre.model_cfg
  run = reconstruction_pass(pre, recordings, mode=mode, ratio=ratio,
                            forecast_patches=forecast_patches, seed=seed, batch_size=batch_size,
                            ar_order=ar_order)
  methods = []
  for name, sums in run.sums.items():
    overall = metrics_lib.reduce_sums({k: v.sum() for k, v in sums.items()})
    per = metrics_lib.reduce_sums(sums)
    entry = {"name": name, "kind": "model" if name == "model" else "baseline",
             "description": baselines_lib.DESCRIPTIONS[name].format(order=ar_order),
             "n": float(sums["n"].sum()), "mse": overall["mse"], "r2": overall["r2"],
             "per_parcel": {"mse": per["mse"].tolist(), "r2": per["r2"].tolist()}}
    if mode == "forecast":
      entry["horizon_mse"] = (run.horizon[name] / (run.n_windows * cfg.num_parcels)).tolist()
    methods.append(entry)
    logging.info("evaluate %-18s masked MSE %.4f  R² %.4f", name, entry["mse"], entry["r2"])
  return {
      "masking": {"mode": mode, "ratio": float(ratio), "forecast_patches": int(forecast_patches),
                  "seed": int(seed)},
      "units": "robust-scaled with the checkpoint's scaler (per-parcel training median and IQR)",
      "num_parcels": cfg.num_parcels, "window": cfg.window, "patch_len": cfg.patch_len,
      "n_windows": run.n_windows, "n_masked_tokens": run.masked_tokens,
      "n_masked_values": int(run.sums["model"]["n"].sum()),
      "fallback_tokens": run.fallback_tokens,
      "ar_order": ar_order if mode == "forecast" else None,
      "methods": methods, "example": run.example,
  }


# ----------------------------------------------------------------------------------------------
# Report.


def _finite(x) -> float:
  return float(x) if x is not None and np.isfinite(x) else float("nan")


def format_table(results: dict) -> str:
  """Markdown: one row per method; lowest MSE / highest R² in bold; per-parcel comparison."""
  methods = results["methods"]
  model_mse = np.asarray(next(m for m in methods if m["kind"] == "model")["per_parcel"]["mse"],
                         np.float64)
  rows = []
  for m in methods:
    parcel_r2 = np.asarray([_finite(v) for v in m["per_parcel"]["r2"]])
    med = float(np.nanmedian(parcel_r2)) if np.isfinite(parcel_r2).any() else float("nan")
    wins = "" if m["kind"] == "model" else (
        f"{int((model_mse < np.asarray(m['per_parcel']['mse'], np.float64)).sum())}"
        f"/{len(model_mse)}")
    rows.append({"name": m["name"], "kind": m["kind"], "metrics": {
        "mse": labels.point(_finite(m["mse"])), "r2": labels.point(_finite(m["r2"])),
        "median_parcel_r2": labels.point(med), "wins": {"text": wins}}})
  return report.metric_table(
      rows, ["mse", "r2", "median_parcel_r2", "wins"],
      columns=(("name", "method"), ("kind", "kind")), bold=["mse", "r2"],
      labels={"mse": "masked MSE", "r2": "R²", "median_parcel_r2": "median parcel R²",
              "wins": "parcels where the model has lower MSE"},
      fmt={"mse": lambda v: report.fmt_score(v, 4), "wins": lambda v: v["text"]})


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
    horizons = len(results["methods"][0]["horizon_mse"])
    lines += ["", "MSE by forecast horizon (timepoints after the last visible one):", "",
              "| method | " + " | ".join(f"+{h + 1}" for h in range(horizons)) + " |",
              "|---|" + "---:|" * horizons]
    lines += [f"| {m['name']} | " + " | ".join(f"{v:.3f}" for v in m["horizon_mse"]) + " |"
              for m in results["methods"]]
  return "\n".join(lines) + "\n"


def _best_baseline(results: dict) -> dict:
  return min((m for m in results["methods"] if m["kind"] == "baseline"),
             key=lambda m: _finite(m["mse"]))


def _figures(results: dict, coords: np.ndarray | None) -> dict:
  """{key: (file name, draw(path))} of evaluate's figures."""
  ex, methods = results["example"], results["methods"]
  model = next(m for m in methods if m["kind"] == "model")
  base = _best_baseline(results)
  shown = [("model", "model", "#1f77b4"), (base["name"], f"{base['name']} (best baseline)",
                                           "#ff7f0e")]
  temporal = next((n for n in ("ar", "interpolation") if n in ex["pred"]), None)
  if temporal not in (None, base["name"]):
    shown.append((temporal, temporal, "#2ca02c"))
  p = results["num_parcels"]
  mode = results["masking"]["mode"]
  r2 = lambda m: np.asarray([_finite(v) for v in m["per_parcel"]["r2"]])  # noqa: E731
  figures = {
      "traces": ("traces.png", lambda path: plots.plot_traces(
          ex["signal"], ex["mask"], [(label, ex["pred"][k], c) for k, label, c in shown],
          np.unique(np.linspace(0, p - 1, min(4, p)).astype(int)), path,
          title=f"Reconstruction of the first evaluation window ({mode} masking)")),
      "parcel_r2": ("parcel_r2.png", lambda path: plots.plot_parcel_r2(
          r2(model), r2(base), base["name"], path,
          title=f"Per-parcel R² (model {_finite(model['r2']):.3f} overall, "
                f"{base['name']} {_finite(base['r2']):.3f})")),
  }
  if coords is not None:
    lim = max(float(np.abs(np.nan_to_num(r2(model))).max()), 1e-3)
    figures["parcel_r2_brain"] = ("parcel_r2_brain.png", lambda path: plots.plot_parcel_map(
        np.nan_to_num(r2(model)), coords, path, title=f"model per-parcel R² ({mode})",
        label="R² of masked values", cmap="RdBu_r", vmin=-lim, vmax=lim))
  if mode == "forecast":
    figures["horizon"] = ("horizon.png", lambda path: plots.plot_horizon(
        [(m["name"], m["horizon_mse"], m["kind"] == "model") for m in methods], path))
  return figures


def write_report(results: dict, out_dir: str, coords: np.ndarray | None = None) -> dict[str, str]:
  """evaluate.json (without the plotting example), evaluate.md, traces.png, parcel_r2.png,
  parcel_r2_brain.png (with coordinates) and horizon.png (forecasting)."""
  return report.write_report(results, out_dir, "evaluate", _markdown(results),
                             figures=_figures(results, coords), exclude=("example",))


# ----------------------------------------------------------------------------------------------
# The job.


class Evaluate(Evaluator):
  """`brainlm-evaluate`: masked reconstruction / forecasting vs baselines on held-out subjects.

  Options: mode (parcel | uniform | forecast), ratio, forecast_patches (default: the run's
  masking), seed (window i's mask: seed, i), batch_size, ar_order.
  """
  name = "evaluate"
  auto_split = "validation"

  def __init__(self, *, mode: str | None = None, ratio: float | None = None,
               forecast_patches: int | None = None, seed: int = 0, batch_size: int = 16,
               ar_order: int = 5, **kw):
    super().__init__(**kw)
    if mode is not None and mode not in masking_lib.MODES:
      raise ValueError(f"mode={mode!r}; expected one of {masking_lib.MODES}")
    self.mode, self.ratio, self.forecast_patches = mode, ratio, forecast_patches
    self.seed, self.batch_size, self.ar_order = seed, batch_size, ar_order

  def masking(self, pre: Pretrained) -> tuple[str, float, int]:
    """(mode, ratio, forecast patches): the options, else the run's masking."""
    run = pre.config.get("masking") or {}
    mode = self.mode or run.get("mode", "uniform")
    ratio = run.get("ratio", 0.75) if self.ratio is None else self.ratio
    return mode, float(ratio), int(self.forecast_patches or run.get("forecast_patches", 1))

  def run(self, pre: Pretrained, out_dir: str) -> dict[str, Any]:
    mode, ratio, k = self.masking(pre)
    masking_lib.num_visible(mode, *token_grid(pre.model_cfg), ratio, k)
    sel = self.select(pre)
    logging.info("Evaluating %s (step %d) on %d recordings (%s of %s), %s masking", pre.path,
                 pre.step, len(sel.recordings), sel.split, sel.data, mode)
    results = evaluate(pre, sel.recordings, mode=mode, ratio=ratio, forecast_patches=k,
                       seed=self.seed, batch_size=self.batch_size, ar_order=self.ar_order)
    results.update(sel.describe(pre), recordings=[r.path for r in sel.recordings])
    results["report"] = write_report(results, out_dir, pre.coords)
    return results

  def summary(self, results: dict) -> dict[str, float]:
    return {f"{m['name']}/{k}": m[k] for m in results["methods"] for k in ("mse", "r2")}

  def describe(self, results: dict) -> str:
    mk = results["masking"]
    return (f"{mk['mode']} masking (ratio {mk['ratio']:g}, forecast patches "
            f"{mk['forecast_patches']}): {results['n_windows']} windows of "
            f"{results['n_recordings']} recordings ({results['split']}), "
            f"{results['n_masked_tokens']} masked tokens\n\n{format_table(results)}")
