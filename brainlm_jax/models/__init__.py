"""The networks: pure Flax modules and their math (no data, no training).

  brainlm.py          ModelConfig and our masked autoencoder `BrainLM` (trained by brainlm-pretrain)
  brainlm_nystrom.py  BrainLM's released `brainlm_mae` model: our embeddings/decoder/head with
                      post-LN Nystromformer layers
  vitmae_image.py     BrainLM's larger released models: a stock ViT-MAE over the recording as an image
  attention.py        scaled dot-product attention (XLA, cuDNN, blockwise flash-style kernel)
  masking.py          which (parcel, time-patch) tokens the encoder sees

Every variant takes the same inputs (signal [B, P, W], coords [P, 3] | None, Masking) and has
`encode(...) -> latent [B, 1 + K, D]` (CLS first) and `reconstruct(...) -> (pred [B, P, W], mask
[B, P, W])`, so evaluation and transfer need not know which one they hold. Tokens are a
`token_grid(cfg)` = (rows, cols) grid: the Masking's shape. Build networks with `build_model`.
"""

from __future__ import annotations

import flax.linen as nn

from brainlm_jax.models.brainlm import BrainLM, ModelConfig

VARIANTS = ("brainlm", "brainlm_nystrom", "vitmae_image")


def build_model(cfg: ModelConfig, name: str | None = None) -> nn.Module:
  """The Flax module of `cfg.variant` (`name`: its name inside a parent module)."""
  if cfg.variant == "brainlm":
    return BrainLM(cfg, name=name)
  # pylint: disable=import-outside-toplevel
  if cfg.variant == "brainlm_nystrom":
    from brainlm_jax.models.brainlm_nystrom import BrainLMNystrom
    return BrainLMNystrom(cfg, name=name)
  if cfg.variant == "vitmae_image":
    from brainlm_jax.models.vitmae_image import ViTMAEImage
    return ViTMAEImage(cfg, name=name)
  raise ValueError(f"model.variant={cfg.variant!r}; expected one of {VARIANTS}")


def token_grid(cfg: ModelConfig) -> tuple[int, int]:
  """(rows, cols) of the token grid a Masking covers: (parcels, time patches), or the image's
  (patch rows, patch columns) for vitmae_image."""
  if cfg.variant == "vitmae_image":
    side = cfg.image_size // cfg.patch_len
    return side, side
  return cfg.num_parcels, cfg.num_patches


def tokens_are_parcel_patches(cfg: ModelConfig) -> bool:
  """Whether token p * T + t is parcel p's time patch t (not so for vitmae_image's image grid)."""
  return cfg.variant != "vitmae_image"
