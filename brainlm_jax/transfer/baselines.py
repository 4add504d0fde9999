"""Baselines of masked reconstruction and forecasting: pure NumPy, one function per baseline.

Shapes: B windows, P parcels, T patches, L timepoints per patch, W = T * L. Each baseline maps
patches [B, P, T, L] and mask [B, P, T] (1 = masked) to predictions [B, P, T, L] of every token
(only the masked ones are scored). A "patch" may be a single value (L = 1, mask [B, P, W]) for
the baselines that only need which values are visible (VALUE_BASELINES).

  train-median        0: robust scaling subtracts the training subjects' per-parcel median.
  parcel-mean         mean of the parcel's visible values in that window.
  interpolation       np.interp in time between the parcel's visible timepoints (flat at the ends).
  nearest-patch       a copy of the parcel's nearest visible patch (ties: the earlier one).
  persistence-value   forecast: the last visible value before the masked patch, repeated.
  persistence-patch   forecast: the last visible patch before the masked patch, copied.
  ar                  forecast: a per-window, per-parcel AR(p) with intercept, least squares on the
                      visible timepoints before the first masked patch, rolled forward.
A parcel with no visible patch in a window (possible with uniform masking) gets 0 (the training
median) from the visible-dependent baselines.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

RECONSTRUCTION_BASELINES = ("train-median", "parcel-mean", "interpolation", "nearest-patch")
FORECAST_BASELINES = ("train-median", "parcel-mean", "persistence-value", "persistence-patch", "ar")
VALUE_BASELINES = ("train-median", "parcel-mean", "interpolation")
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


def baseline_fns(mode: str, ar_order: int = 5, *,
                 values_only: bool = False) -> dict[str, Callable]:
  """name -> fn(patches, mask) -> pred, for a masking mode (`values_only`: the baselines that
  work on single values, for masks that do not follow the time patches)."""
  fns = {"train-median": lambda x, m: np.zeros_like(x, np.float32), "parcel-mean": parcel_mean,
         "interpolation": interpolation, "nearest-patch": nearest_patch,
         "persistence-value": functools.partial(persistence, last="value"),
         "persistence-patch": functools.partial(persistence, last="patch"),
         "ar": functools.partial(autoregressive, order=ar_order)}
  names = FORECAST_BASELINES if mode == "forecast" else RECONSTRUCTION_BASELINES
  return {n: fns[n] for n in names if n in VALUE_BASELINES or not values_only}
