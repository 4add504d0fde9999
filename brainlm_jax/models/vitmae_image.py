"""BrainLM's larger released models: a stock ViT-MAE over the recording drawn as an image.

Input preparation (BrainLM's; done inside the model, so it takes the same inputs as model.BrainLM):

  window [P, W] (robust-scaled signal, parcels x timepoints)
    -> rows reordered by parcel Y coordinate (ascending; ties keep atlas order)
    -> divided by value_scale (BrainLM: 5.6430855, the max of its robust-scaled training data)
    -> padded with pad_value (-1) to a square S x S: (S - P) // 2 rows above, the rest below;
       (S - W) // 2 columns left, the rest right (BrainLM: 424 x 200 -> 432 x 432 for 16-pixel
       patches, 434 x 434 for 14)
    -> repeated to C = 3 channels                                        image [B, C, S, S]

ViT-MAE (Hugging Face ViTMAEForPreTraining): p x p patches (p = patch_len) flattened in (row,
column, channel) order, N = (S/p)^2 tokens; Dense(p*p*C -> D) + fixed 2-D sin-cos positions;
CLS (+ position 0); pre-LN ViT encoder with erf GELU (model.Transformer, final LayerNorm);
decoder Dense(D->E), mask tokens, + 2-D sin-cos positions, model.Transformer,
Dense(E -> p*p*C) per token. Masking is over the (S/p) x (S/p) patch grid (models.token_grid).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.models.brainlm import MaskedAutoencoder, Transformer, decoder_tokens
from brainlm_jax.models.brainlm import dense
from brainlm_jax.models.masking import Masking

Array = jax.Array

__all__ = ["ViTMAEImage", "image_to_signal", "parcel_order", "patchify", "recording_to_image",
           "signal_to_image", "sincos_2d", "unpatchify"]

BRAINLM_VALUE_SCALE = 5.6430855  # BrainLM's max_val_to_scale for robust-scaled A424 data


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos positions of a grid x grid patch grid, with a zero row for CLS first:
  float32 [1 + grid * grid, dim] (first half encodes the column, second half the row, as in
  MAE's reference code)."""
  if dim % 4:
    raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0).astype(np.float32)


def parcel_order(coords: Array) -> Array:
  """Parcel indices sorted by Y coordinate (ascending, stable). coords [P, 3] -> int [P]."""
  return jnp.argsort(jnp.asarray(coords)[:, 1], stable=True)


def _pads(size: int, image_size: int, what: str) -> tuple[int, int]:
  if size > image_size:
    raise ValueError(f"{what}={size} does not fit in model.image_size={image_size}")
  before = (image_size - size) // 2
  return before, image_size - size - before


def signal_to_image(signal: Array, coords: Array, *, image_size: int, value_scale: float = 1.0,
                    pad_value: float = -1.0, channels: int = 3) -> Array:
  """BrainLM's image of windows: signal [B, P, W], coords [P, 3] -> [B, C, S, S] (S=image_size)."""
  _, p, w = signal.shape
  x = jnp.take(jnp.asarray(signal), parcel_order(coords), axis=1) / value_scale
  x = jnp.pad(x, ((0, 0), _pads(p, image_size, "parcels"), _pads(w, image_size, "window")),
              constant_values=pad_value)
  return jnp.repeat(x[:, None], channels, axis=1)


def image_to_signal(images: Array, coords: Array, num_parcels: int, window: int, *,
                    value_scale: float = 1.0) -> Array:
  """Inverse of `signal_to_image`: [B, C, S, S] -> [B, P, W] (channel mean, padding cropped,
  original parcel order, value_scale undone)."""
  s = images.shape[-1]
  top, left = _pads(num_parcels, s, "parcels")[0], _pads(window, s, "window")[0]
  x = images.mean(axis=1)[:, top:top + num_parcels, left:left + window] * value_scale
  return jnp.zeros_like(x).at[:, parcel_order(coords)].set(x)


def recording_to_image(window: np.ndarray, coords: np.ndarray, *, image_size: int,
                       value_scale: float = BRAINLM_VALUE_SCALE, pad_value: float = -1.0,
                       channels: int = 3) -> np.ndarray:
  """One scaled window [time, parcels] + coords [parcels, 3] -> image float32 [C, S, S]."""
  window = np.asarray(window, np.float32)
  if window.ndim != 2 or np.shape(coords) != (window.shape[1], 3):
    raise ValueError(f"expected a [time, parcels] window and [parcels, 3] coords, got "
                     f"{window.shape} and {np.shape(coords)}")
  return np.asarray(signal_to_image(window.T[None], np.asarray(coords), image_size=image_size,
                                    value_scale=value_scale, pad_value=pad_value,
                                    channels=channels)[0])


def patchify(images: Array, patch: int) -> Array:
  """[B, C, S, S] -> [B, (S/p)^2, p * p * C], each patch flattened (row, column, channel)."""
  b, c, s, _ = images.shape
  g = s // patch
  x = images.reshape(b, c, g, patch, g, patch)
  return jnp.einsum("bchpwq->bhwpqc", x).reshape(b, g * g, patch * patch * c)


def unpatchify(tokens: Array, patch: int, channels: int) -> Array:
  """Inverse of `patchify`: [B, N, p * p * C] -> [B, C, S, S]."""
  b, n, _ = tokens.shape
  g = int(round(n ** 0.5))
  x = tokens.reshape(b, g, g, patch, patch, channels)
  return jnp.einsum("bhwpqc->bchpwq", x).reshape(b, channels, g * patch, g * patch)


def _fixed(table: np.ndarray):
  return nn.with_logical_partitioning(lambda *_: jnp.asarray(table), (None, "embed"))


class ViTMAEImage(MaskedAutoencoder):
  """ViT-MAE over BrainLM's recording image (see module doc); `__call__` returns pixels
  [B, N, p * p * C] for every patch."""

  def setup(self):
    cfg = self.cfg
    if cfg.image_size <= 0 or cfg.image_size % cfg.patch_len:
      raise ValueError(f"model.image_size={cfg.image_size} must be a positive multiple of "
                       f"model.patch_len={cfg.patch_len} for variant 'vitmae_image'")
    grid = cfg.image_size // cfg.patch_len
    self.patch_embed = dense(cfg.hidden_size, ("patch", "embed"), cfg.dtype, cfg.param_dtype,
                              "patch_embed")
    self.pos_embed = self.param("pos_embed", _fixed(sincos_2d(cfg.hidden_size, grid)))
    self.cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, None, "embed")),
                          (1, 1, cfg.hidden_size), cfg.param_dtype)
    self.encoder = Transformer(cfg, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, name="encoder")
    self.decoder_embed = dense(cfg.decoder_hidden_size, ("embed", "mlp"), cfg.dtype,
                                cfg.param_dtype, "decoder_embed")
    self.decoder_pos_embed = self.param("decoder_pos_embed",
                                        _fixed(sincos_2d(cfg.decoder_hidden_size, grid)))
    self.mask_token = self.param(
        "mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   (None, None, "embed")),
        (1, 1, cfg.decoder_hidden_size), cfg.param_dtype)
    self.decoder = Transformer(cfg, cfg.decoder_num_layers, cfg.decoder_num_heads,
                               cfg.decoder_mlp_dim, name="decoder")
    self.decoder_pred = dense(cfg.patch_len ** 2 * cfg.image_channels, ("mlp", "patch"),
                               cfg.dtype, cfg.param_dtype, "decoder_pred")
    self.embed_dropout = nn.Dropout(cfg.dropout)

  def images(self, signal: Array, coords: Array | None) -> Array:
    """signal [B, P, W], coords [P, 3] -> BrainLM's image [B, C, S, S]."""
    cfg = self.cfg
    if coords is None:
      raise ValueError("variant 'vitmae_image' needs parcel coordinates (rows are ordered by Y)")
    if signal.shape[1:] != (cfg.num_parcels, cfg.window):
      raise ValueError(f"signal has {signal.shape[1]} parcels x {signal.shape[2]} timepoints; "
                       f"the model expects {cfg.num_parcels} x {cfg.window}")
    return signal_to_image(signal.astype(jnp.float32), coords, image_size=cfg.image_size,
                           value_scale=cfg.value_scale, pad_value=cfg.pad_value,
                           channels=cfg.image_channels)

  def encode(self, signal: Array, coords: Array | None, masking: Masking, *,
             train: bool = False) -> Array:
    """signal [B, P, W], coords [P, 3] -> latent [B, 1 + K, D] (CLS first)."""
    cfg = self.cfg
    pos = jax.lax.stop_gradient(jnp.asarray(self.pos_embed, cfg.dtype))
    x = patchify(self.images(signal, coords), cfg.patch_len).astype(cfg.dtype)
    x = self.patch_embed(x) + pos[None, 1:]
    x = jnp.take_along_axis(x, masking.ids_keep[..., None], axis=1)
    cls = jnp.asarray(self.cls, cfg.dtype) + pos[None, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    x = self.embed_dropout(x, deterministic=not train)
    return self.encoder(x, not train)

  def decode(self, latent: Array, coords: Array | None, masking: Masking, *,
             train: bool = False) -> Array:
    """latent [B, 1 + K, D] -> per-patch pixels [B, N, p * p * C] for every patch."""
    del coords  # positions are fixed by the patch grid
    cfg = self.cfg
    _, rows, cols = masking.mask.shape
    x = jnp.concatenate(decoder_tokens(self, latent, masking, rows * cols), axis=1)
    x = x + jax.lax.stop_gradient(jnp.asarray(self.decoder_pos_embed, cfg.dtype))[None]
    x = self.decoder(x, not train)
    return self.decoder_pred(x[:, 1:]).astype(jnp.float32)

  def reconstruct(self, signal: Array, coords: Array | None, masking: Masking) -> tuple[Array, Array]:
    """The predicted pixels mapped back to the signal's layout: (pred [B, P, W] float32, mask
    [B, P, W], 1 where the value's image patch was masked)."""
    cfg = self.cfg
    pixels, _ = self(signal, coords, masking)
    b, p, w = signal.shape
    images = unpatchify(pixels, cfg.patch_len, cfg.image_channels)
    pred = image_to_signal(images, coords, p, w, value_scale=cfg.value_scale)
    patch_mask = jnp.repeat(jnp.repeat(masking.mask, cfg.patch_len, axis=1), cfg.patch_len, axis=2)
    mask = image_to_signal(patch_mask[:, None].astype(jnp.float32), coords, p, w)
    return pred.astype(jnp.float32), mask
