"""Token masking for the masked autoencoder: which (parcel, time-patch) tokens the encoder sees.

A sample is a grid of `parcels x patches` tokens, flattened parcel-major: token `p * patches + t`.
Every mode returns a `Masking`:

  ids_keep: int32 [batch, num_visible]     flat indices of visible tokens, ascending.
  mask:     float32 [batch, parcels, patches]  1 = masked (to reconstruct), 0 = visible.

Because every sample of a batch keeps the same number of tokens, the encoder runs on a dense
`[batch, num_visible, hidden]` array (no padding, no attention mask).

Modes (BrainLM's `brainlm_mae/modeling_brainlm.py` names in brackets)
  uniform   the default, what BrainLM's forward calls [`random_masking`] (and ViT-MAE's): a random
            subset of all parcel x patch tokens, the same count per sample; it keeps
            `int(tokens * (1 - ratio))`, as BrainLM does.
  parcel    in every parcel the same number of patches is masked, chosen at random
            independently per parcel [`random_masking_4D`, defined but never called by BrainLM];
            it keeps `int(patches * (1 - ratio))` per parcel, as that function does, so with few
            patches the masked share can be far from `ratio` (3 patches at 0.5: 2 of 3 masked).
            `effective_ratio` says what a mode really masks; pretraining logs it.
  forecast  the last `forecast_patches` patches of every parcel are masked (predict the future)
            [`last_timepoints_masking`].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODES = ("uniform", "parcel", "forecast")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Masking:
  ids_keep: jax.Array  # int32 [batch, num_visible]
  mask: jax.Array  # float32 [batch, parcels, patches], 1 = masked


def place_visible(grid: jax.Array, ids_keep: jax.Array, values) -> jax.Array:
  """grid [B, N, ...] with `values` ([B, K, ...] or a scalar) written at the tokens `ids_keep`
  [B, K]. The indices of a row are distinct, and saying so keeps the scatter's JVP a plain
  scatter (no u32 winner-id scatter the size of the grid)."""
  rows = jnp.arange(grid.shape[0])[:, None]
  return grid.at[rows, ids_keep].set(values, unique_indices=True)


def num_visible(mode: str, parcels: int, patches: int, ratio: float,
                forecast_patches: int = 1) -> int:
  """Number of visible tokens per sample for a masking mode."""
  if mode == "parcel":
    return parcels * _keep_count(patches, ratio)
  if mode == "uniform":
    return _keep_count(parcels * patches, ratio)
  if mode == "forecast":
    if not 0 < forecast_patches < patches:
      raise ValueError(
          f"masking.forecast_patches={forecast_patches} must be in [1, {patches - 1}] "
          f"for {patches} patches per window")
    return parcels * (patches - forecast_patches)
  raise ValueError(f"Unknown masking mode {mode!r}; expected one of {MODES}")


def effective_ratio(mode: str, parcels: int, patches: int, ratio: float,
                    forecast_patches: int = 1) -> float:
  """The share of a sample's tokens that a masking mode really masks (`ratio` is what was asked:
  the keep counts are rounded down, per parcel in `parcel` mode)."""
  n = parcels * patches
  return 1.0 - num_visible(mode, parcels, patches, ratio, forecast_patches) / n


def _keep_count(n: int, ratio: float) -> int:
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
  return max(1, int(n * (1.0 - ratio)))


def make_masking(rng: jax.Array, batch: int, parcels: int, patches: int, *, mode: str,
                 ratio: float, forecast_patches: int = 1) -> Masking:
  """Draws a masking for a batch. Deterministic in `rng`."""
  keep = num_visible(mode, parcels, patches, ratio, forecast_patches)
  n = parcels * patches
  if mode == "parcel":
    k = keep // parcels
    noise = jax.random.uniform(rng, (batch, parcels, patches))
    order = jnp.argsort(noise, axis=-1)[..., :k]  # [B, P, k] kept patch indices
    ids = order + (jnp.arange(parcels) * patches)[None, :, None]
    ids_keep = jnp.sort(ids.reshape(batch, keep), axis=-1)
  elif mode == "uniform":
    noise = jax.random.uniform(rng, (batch, n))
    ids_keep = jnp.sort(jnp.argsort(noise, axis=-1)[:, :keep], axis=-1)
  else:  # forecast
    k = patches - forecast_patches
    ids = (jnp.arange(parcels)[:, None] * patches + jnp.arange(k)[None, :]).reshape(-1)
    ids_keep = jnp.broadcast_to(ids, (batch, keep))
  ids_keep = ids_keep.astype(jnp.int32)
  visible = place_visible(jnp.zeros((batch, n), jnp.float32), ids_keep, 1.0)
  return Masking(ids_keep=ids_keep, mask=(1.0 - visible).reshape(batch, parcels, patches))


def no_masking(batch: int, parcels: int, patches: int) -> Masking:
  """All tokens visible (for embedding extraction)."""
  n = parcels * patches
  ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  return Masking(ids_keep=ids, mask=jnp.zeros((batch, parcels, patches), jnp.float32))
