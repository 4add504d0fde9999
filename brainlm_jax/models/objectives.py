"""Pretraining losses beside the masked-reconstruction one (`brainlm.masked_loss`), as pure
functions of the encoder's output.

The connectivity objective (`train.objective='conn'`): from the encoder's tokens of one window
(the context, every token seen), predict the functional connectivity of the adjacent, disjoint
stretch of the same recording (the target, `train.target_window` timepoints). The prediction is
`connectivity.patch_correlation` of the last layer's tokens: FC read through the encoder, exactly
the `patches-fc` reading the probes take of a frozen encoder (transfer/features.py; before its
Fisher z). At a random
init it is close to the context window's own FC, the baseline it has to beat
(`eval_conn_fc_baseline`); training turns it into a forecast of the recording's connectivity at
other times, its stable, individual part, which is what subject identity and clinical labels
live in. Two losses (`train.conn_kind`):
  mse        the squared error against the target's Pearson FC, over the pairs of live parcels
  deviation  1 - the correlation, over every live pair of every sample of the batch, of both
             minus their mean over the batch's samples: only what tells one recording's
             connectivity from the others' (the pattern every subject shares tells none apart)

  pred = connectivity.patch_correlation(tokens [B, P, T, D], live)   [B, P, P]
  loss = connectivity_loss(pred, target [B, P, W_t], live)           'mse'
  loss = deviation_loss(pred, target, live)                          'deviation'
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.models import connectivity

Array = jax.Array
OBJECTIVES = ("mae", "conn")
CONN_KINDS = ("mse", "deviation")


def pair_weights(live: Array) -> Array:
  """[B, P, P]: 1 for the pairs p < q of two live parcels, else 0 (each pair counted once)."""
  p = live.shape[-1]
  upper = jnp.triu(jnp.ones((p, p), jnp.float32), k=1)
  return live[:, :, None] * live[:, None, :] * upper


def connectivity_loss(pred: Array, target: Array, live: Array) -> Array:
  """Mean squared error between `pred` [B, P, P] and the target stretch's Pearson FC (`pearson`
  of target [B, P, W_t]) over the pairs of live parcels (live [B, P])."""
  w = pair_weights(live)
  err = pred - connectivity.pearson(target)
  return (jnp.square(err) * w).sum() / jnp.maximum(w.sum(), 1.0)


def deviation_sums(pred: Array, fc: Array, w: Array) -> tuple[Array, Array, Array]:
  """(sum xy, sum xx, sum yy) of x = pred, y = fc [B, P, P], each minus its mean over the batch's
  samples per pair, over the pairs of weight w [B, P, P] (`pair_weights`)."""
  n = jnp.maximum(w.sum(axis=0, keepdims=True), 1.0)
  x = (pred - (pred * w).sum(axis=0, keepdims=True) / n) * w
  y = (fc - (fc * w).sum(axis=0, keepdims=True) / n) * w
  return (x * y).sum(), (x * x).sum(), (y * y).sum()


def pair_sums(x: Array, y: Array, w: Array) -> tuple[Array, ...]:
  """Per-pair sufficient statistics [P, P] of x, y [B, P, P] over the samples where the pair has
  weight w [B, P, P]: (n, sum x, sum y, sum xy, sum xx, sum yy). Summed over batches and reduced
  by `pooled_deviation_r`, they give the deviation correlation of all the batches at once."""
  wx, wy = w * x, w * y
  return (w.sum(0), wx.sum(0), wy.sum(0), (wx * y).sum(0), (wx * x).sum(0), (wy * y).sum(0))


def pooled_deviation_r(n, sx, sy, sxy, sxx, syy) -> float:
  """The correlation, over every pair of every sample, of x and y each minus its mean over all
  the samples (per pair), from `pair_sums` added over any number of batches (host, float64):
  the same as `1 - deviation_loss` on all the samples in one batch."""
  n, sx, sy, sxy, sxx, syy = (np.asarray(a, np.float64) for a in (n, sx, sy, sxy, sxx, syy))
  inv = np.where(n > 0, 1.0 / np.maximum(n, 1.0), 0.0)
  cxy, cxx, cyy = ((sxy - sx * sy * inv).sum(), (sxx - sx * sx * inv).sum(),
                   (syy - sy * sy * inv).sum())
  return float(cxy / max(np.sqrt(max(cxx, 0.0) * max(cyy, 0.0)), 1e-12))


def deviation_loss(pred: Array, target: Array, live: Array) -> Array:
  """1 - the Pearson correlation, over every pair of live parcels of every sample, of `pred`
  [B, P, P] and the target's FC, each minus its mean over the batch's samples (per pair).
  Scale-free: the prediction need not reproduce FC's values, only its individual differences."""
  sxy, sxx, syy = deviation_sums(pred, connectivity.pearson(target), pair_weights(live))
  return 1.0 - sxy * jax.lax.rsqrt(jnp.maximum(sxx * syy, connectivity.EPS))


LOSSES = {"mse": connectivity_loss, "deviation": deviation_loss}


def split_pair(signal: Array, window: int, flip: Array | None = None) -> tuple[Array, Array]:
  """A sample of `window` + W_t timepoints [B, P, window + W_t] -> (context [B, P, window],
  target [B, P, W_t]): two adjacent, disjoint stretches of one recording. flip [B] (bool): that
  sample's target comes first and its context after."""
  w_t = signal.shape[-1] - window
  first = (signal[..., :window], signal[..., window:])
  if flip is None:
    return first
  f = flip[:, None, None]
  return (jnp.where(f, signal[..., w_t:], first[0]), jnp.where(f, signal[..., :w_t], first[1]))
