"""Network variants, chosen by `ModelConfig.variant`.

  brainlm          our masked autoencoder (brainlm_jax/model.py), trained by `brainlm-pretrain`
  brainlm_nystrom  BrainLM's released `brainlm_mae` model: our embeddings/decoder/head with
                   post-LN Nystromformer layers (models/brainlm_nystrom.py)
  vitmae_image     BrainLM's larger released models: a stock ViT-MAE over the recording as an
                   image (models/vitmae_image.py)

Every variant takes the same inputs (signal [B, P, W], coords [P, 3] | None, Masking) and has
`encode(...) -> latent [B, 1 + K, D]` (CLS first), so probing and fine-tuning need not know which
one they hold. Tokens are a `token_grid(cfg)` = (rows, cols) grid: the Masking's shape.
"""

from __future__ import annotations

import flax.linen as nn

from brainlm_jax.model import BrainLM, ModelConfig

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
