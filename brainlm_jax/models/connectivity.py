"""Parcel x parcel connectivity of signals and of the encoder's tokens, in JAX.

  pearson(signal [B, P, W]) -> [B, P, P]                      functional connectivity (FC)
  patch_correlation(tokens [B, P, T, D], usable [B, P]) -> [B, P, P]

`patch_correlation` is FC read through the encoder: a token is one parcel's time patch, so two
parcels' tokens side by side over the T patches are their signals seen through the network.
Each parcel's tokens lose their mean over the window's patches (what every token of the parcel
shares: the learned parcel identity, and the window's mean level, as Pearson FC removes each
series' mean), each patch's tokens lose their mean over the usable parcels (the time code and
the global signal of that moment); the rest is correlated over the T x D entries. With a linear
patch embedding whose columns are near-orthogonal (a random init) it is close to the window's FC
itself; what training does to it is what the probes read (`tokens-fc` in transfer/features.py
correlates the time-averaged tokens instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
EPS = 1e-6


def unit_rows(x: Array) -> Array:
  """Each row [..., F] centred over its F entries and scaled to unit norm (0 stays 0)."""
  x = x - x.mean(axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), EPS))


def pearson(signal: Array) -> Array:
  """signal [B, P, W] -> [B, P, P] float32: each sample's parcel x parcel Pearson correlation over
  time (0 for a constant parcel)."""
  x = unit_rows(signal.astype(jnp.float32))
  return jnp.einsum("bpw,bqw->bpq", x, x)


def patch_correlation(tokens: Array, usable: Array | None = None) -> Array:
  """tokens [B, P, T, D] (parcel p's patch t) -> [B, P, P] float32 (see the module docstring);
  usable [B, P]: 0 for a parcel left out of the patch means (a dead one), whose row is 0."""
  b, p, t, d = tokens.shape
  x = tokens.astype(jnp.float32)
  x = x - x.mean(axis=2, keepdims=True)
  w = jnp.ones((b, p), jnp.float32) if usable is None else usable.astype(jnp.float32)
  w = w[:, :, None, None]
  x = (x - (x * w).sum(axis=1, keepdims=True) / jnp.maximum(w.sum(axis=1, keepdims=True), 1.0))
  x = unit_rows((x * w).reshape(b, p, t * d))
  return jnp.einsum("bpf,bqf->bpq", x, x)
