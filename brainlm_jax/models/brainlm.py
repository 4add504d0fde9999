"""BrainLM masked autoencoder in Flax (linen).

Shapes (B batch, P parcels, W window timepoints, L patch length, T = W // L patches, N = P * T,
K visible tokens, D encoder width, E decoder width):

  signal [B, P, W] --patchify--> [B, P, T, L]
  token  = Dense(L->D)(patch) + spatial(parcel) + sin_time(t)          [B, N, D]
  encoder: CLS + visible tokens (gathered by `ids_keep`)               [B, 1+K, D]
  decoder: Dense(D->E), mask tokens scattered back to every position,
           + its own spatial and time embeddings, transformer, LayerNorm,
           head Dense(E->E/2) -> LeakyReLU(0.1) -> Dense(E/2->L)         [B, P, T, L]

Spatial embedding: a linear projection of the parcel's XYZ coordinate (MNI mm, times
`coord_scale`), or a learned per-parcel table when no coordinates are given. Time embedding:
fixed sinusoid over patch index (as in BrainLM). Blocks are pre-LN ViT blocks. Every parameter
names logical axes (`embed`, `mlp`, `heads`, `kv`, ...) that `training/sharding.py` maps onto the
mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.models import attention as attention_lib
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.masking import Masking

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the network (hashable: it is a Flax module attribute)."""
  num_parcels: int = 424
  window: int = 200
  patch_len: int = 20
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  decoder_hidden_size: int = 256
  decoder_num_layers: int = 2
  decoder_num_heads: int = 4
  decoder_mlp_dim: int = 1024
  spatial: str = "xyz"  # 'xyz' (coordinates) or 'learned' (per-parcel table)
  spatial_init_std: float = 0.02  # 'learned': the table's init std (ViT's 0.02; nn.Embed's ~1)
  coord_scale: float = 0.01  # MNI mm x this (BrainLM: 1, raw mm; converted weights use 1)
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  attention: str = "auto"  # auto | xla | cudnn | blockwise | pallas_tpu
  attention_block_q: int = 512
  attention_block_k: int = 1024
  scan_layers: bool = False
  remat: str = "none"  # none | full | dots
  # Variants that run imported BrainLM weights (brainlm_jax/models/, docs/convert.md).
  variant: str = "brainlm"  # brainlm | brainlm_nystrom | vitmae_image
  exact_gelu: bool = False  # erf GELU (PyTorch's) instead of the tanh approximation
  num_landmarks: int = 0  # brainlm_nystrom: Nystrom landmarks (== segment_means_seq_len: exact)
  segment_means_seq_len: int = 0
  conv_kernel_size: int = 0  # brainlm_nystrom: per-head convolution over values (0: none)
  image_size: int = 0  # vitmae_image: side of the padded square image (patch side = patch_len)
  image_channels: int = 3
  pad_value: float = -1.0  # vitmae_image: value of the padding pixels
  value_scale: float = 1.0  # vitmae_image: the signal is divided by this before padding

  @property
  def num_patches(self) -> int:
    return self.window // self.patch_len

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds from a ConfigDict/dict; unknown keys raise naming the key."""
    d = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown model config key(s): {unknown}; known: {sorted(names)}")
    return cls(**d)


def sinusoid_table(length: int, dim: int) -> np.ndarray:
  """[length, dim] sin on even, cos on odd channels (Vaswani et al.; BrainLM's time code)."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
  table = np.zeros((length, dim), np.float64)
  table[:, 0::2] = np.sin(pos * div)
  table[:, 1::2] = np.cos(pos * div)[:, : dim // 2]
  return table.astype(np.float32)


def dense(features, axes, dtype, param_dtype, name, use_bias=True, bias_axes=None):
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype, name=name, use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_axes or axes[-1:]))


def layer_norm(cfg: ModelConfig, name: str):
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class _GeneralPartitioned(nn.LogicallyPartitioned):
  """nn.LogicallyPartitioned for `nn.DenseGeneral`'s params, which Flax initialises flat (e.g. [D, H * K]
  for a [D, H, K] kernel) and unboxes before reshaping: the logical constraint is applied only
  once the value has the rank its names describe (the reshaped param)."""

  def unbox(self, apply_constraint=True):
    if jnp.ndim(self.value) != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def general_partitioning(init, names: tuple):
  """`nn.with_logical_partitioning` for nn.DenseGeneral's kernel_init / bias_init."""
  return lambda *args: _GeneralPartitioned(init(*args), names)


def qkv_projections(cfg: ModelConfig, x: Array, num_heads: int) -> tuple[Array, Array, Array]:
  """x [B, S, D] -> query, key, value [B, S, H, D // H] (submodules 'query', 'key', 'value')."""
  init = nn.initializers.xavier_uniform()

  def proj(name):
    return nn.DenseGeneral(
        (num_heads, x.shape[-1] // num_heads), axis=-1, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name,
        kernel_init=general_partitioning(init, ("embed", "heads", "kv")),
        bias_init=general_partitioning(nn.initializers.zeros, ("heads", "kv")))(x)

  return proj("query"), proj("key"), proj("value")


def output_projection(cfg: ModelConfig, out: Array, d: int) -> Array:
  """Attention output [B, S, H, D // H] -> [B, S, d] (submodule 'out')."""
  return nn.DenseGeneral(
      d, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out",
      kernel_init=general_partitioning(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(out)


def sow_cls_attention(module: nn.Module, q: Array, k: Array) -> None:
  """Sows the first (CLS) query's softmax attention over every key, averaged over heads, as
  intermediate 'cls_attention' [B, S] (float32) when the caller asked for intermediates
  (`mutable=['intermediates']`); otherwise nothing is computed."""
  if module.is_mutable_collection("intermediates"):
    weights = attention_lib.attention_weights(q[:, :1].astype(jnp.float32), k.astype(jnp.float32))
    module.sow("intermediates", "cls_attention", weights[:, :, 0].mean(axis=1))


def attention_inputs(module: nn.Module, x: Array, num_heads: int) -> tuple[Array, Array, Array]:
  """x [B, S, D] -> query, key, value [B, S, H, D // H] of `module`'s projections, under the
  activation rules; sows the CLS attention when asked (`sow_cls_attention`)."""
  q, k, v = qkv_projections(module.cfg, x, num_heads)
  q, k, v = (nn.with_logical_constraint(t, ("act_batch", "act_len", "act_heads", None))
             for t in (q, k, v))
  sow_cls_attention(module, q, k)
  return q, k, v


def attend(cfg: ModelConfig, q: Array, k: Array, v: Array) -> Array:
  """Softmax attention [B, S, H, K] with the config's implementation (attention.py)."""
  return attention_lib.dot_product_attention(
      q, k, v, implementation=cfg.attention, block_q=cfg.attention_block_q,
      block_k=cfg.attention_block_k)


def mlp(cfg: ModelConfig, x: Array, mlp_dim: int) -> Array:
  """The transformer MLP, [B, S, D] -> [B, S, D]: Dense 'mlp_in' -> GELU -> Dense 'mlp_out'."""
  y = dense(mlp_dim, ("embed", "mlp"), cfg.dtype, cfg.param_dtype, "mlp_in")(x)
  y = nn.gelu(y, approximate=not cfg.exact_gelu)
  y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_mlp"))
  return dense(x.shape[-1], ("mlp", "embed"), cfg.dtype, cfg.param_dtype, "mlp_out")(y)


class SelfAttention(nn.Module):
  """Multi-head self-attention, [B, S, D] -> [B, S, D]."""
  cfg: ModelConfig
  num_heads: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    q, k, v = attention_inputs(self, x, self.num_heads)
    return output_projection(self.cfg, attend(self.cfg, q, k, v), x.shape[-1])


def decoder_tokens(module: nn.Module, latent: Array, masking: Masking,
                   num_tokens: int) -> tuple[Array, Array]:
  """The decoder's input of a masked autoencoder `module` (with `decoder_embed` and `mask_token`):
  latent [B, 1 + K, D] -> (CLS [B, 1, E], tokens [B, num_tokens, E]: the embedded visible tokens
  in their places, `mask_token` everywhere else)."""
  x = module.decoder_embed(latent)
  grid = jnp.broadcast_to(jnp.asarray(module.mask_token, module.cfg.dtype),
                          (x.shape[0], num_tokens, x.shape[-1]))
  return x[:, :1], masking_lib.place_visible(grid, masking.ids_keep, x[:, 1:])


class Block(nn.Module):
  """Pre-LN transformer block. Returns (x, None) so it can be `nn.scan`-ned."""
  cfg: ModelConfig
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: Array, deterministic: bool):
    cfg = self.cfg
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    y = SelfAttention(cfg, self.num_heads, name="attention")(layer_norm(cfg, "ln_attention")(x))
    x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    y = mlp(cfg, layer_norm(cfg, "ln_mlp")(x), self.mlp_dim)
    x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    return x, None


class Transformer(nn.Module):
  """A stack of `num_layers` blocks, optionally scanned (compile time flat in depth) and remat-ed."""
  cfg: ModelConfig
  num_layers: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    block = Block
    if cfg.remat != "none":
      policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
      if cfg.remat not in policy:
        raise ValueError(f"model.remat={cfg.remat!r}; expected none | full | dots")
      block = nn.remat(block, policy=policy[cfg.remat], static_argnums=(2,),
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, self.num_heads, self.mlp_dim, name="layers")(x, deterministic)
    else:
      for i in range(self.num_layers):
        x, _ = block(cfg, self.num_heads, self.mlp_dim, name=f"layer_{i}")(x, deterministic)
        self.sow("intermediates", "hidden", x)  # each layer's output (kept only on request)
    return layer_norm(cfg, "ln_final")(x)


class Spatial(nn.Module):
  """Spatial embedding per parcel: [P, 3] coordinates (or None) -> [P, D]."""
  cfg: ModelConfig
  features: int

  @nn.compact
  def __call__(self, coords: Array | None) -> Array:
    cfg = self.cfg
    if cfg.spatial == "xyz":
      if coords is None:
        raise ValueError("model.spatial='xyz' needs parcel coordinates (data.coords); "
                         "use model.spatial='learned' when none are available")
      return dense(self.features, ("xyz", "embed"), cfg.dtype, cfg.param_dtype, "xyz")(
          coords.astype(jnp.float32) * cfg.coord_scale)
    if cfg.spatial == "learned":
      table = self.param(
          "table", nn.with_logical_partitioning(nn.initializers.normal(cfg.spatial_init_std),
                                         ("parcels", "embed")),
          (cfg.num_parcels, self.features), cfg.param_dtype)
      return jnp.asarray(table, cfg.dtype)
    raise ValueError(f"model.spatial={cfg.spatial!r}; expected 'xyz' or 'learned'")


class MaskedAutoencoder(nn.Module):
  """What every network variant is: `encode` (visible tokens -> latent), `decode` (latent ->
  predictions for every token), `reconstruct` (predictions in the signal's layout, for
  evaluation); `__call__` is encode then decode."""
  cfg: ModelConfig

  def __call__(self, signal: Array, coords: Array | None, masking: Masking, *,
               train: bool = False) -> tuple[Array, Array]:
    """Returns (the decoder's predictions for every token, float32; latent [B, 1 + K, D])."""
    latent = self.encode(signal, coords, masking, train=train)
    return self.decode(latent, coords, masking, train=train), latent


class BrainLM(MaskedAutoencoder):
  """The masked autoencoder. `__call__` returns predictions [B, P, T, L] for every token; see
  `encode`."""
  transformer_cls = Transformer  # encoder/decoder stack; variants (brainlm_jax/models/) swap it

  def setup(self):
    cfg = self.cfg
    if cfg.window % cfg.patch_len:
      raise ValueError(f"window={cfg.window} is not divisible by patch_len={cfg.patch_len}")
    self.patch_embed = dense(cfg.hidden_size, ("patch", "embed"), cfg.dtype, cfg.param_dtype,
                              "patch_embed")
    self.spatial = Spatial(cfg, cfg.hidden_size, name="spatial")
    self.cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, None, "embed")),
                          (1, 1, cfg.hidden_size), cfg.param_dtype)
    self.encoder = self.transformer_cls(cfg, cfg.num_layers, cfg.num_heads, cfg.mlp_dim,
                                        name="encoder")
    self.decoder_embed = dense(cfg.decoder_hidden_size, ("embed", "mlp"), cfg.dtype,
                                cfg.param_dtype, "decoder_embed")
    self.decoder_spatial = Spatial(cfg, cfg.decoder_hidden_size, name="decoder_spatial")
    self.mask_token = self.param(
        "mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   (None, None, "embed")),
        (1, 1, cfg.decoder_hidden_size), cfg.param_dtype)
    self.decoder = self.transformer_cls(cfg, cfg.decoder_num_layers, cfg.decoder_num_heads,
                                        cfg.decoder_mlp_dim, name="decoder")
    self.head_hidden = dense(cfg.decoder_hidden_size // 2, ("embed", "mlp"), cfg.dtype,
                              cfg.param_dtype, "head_hidden")
    self.head_out = dense(cfg.patch_len, ("mlp", "patch"), cfg.dtype, cfg.param_dtype, "head_out")
    self.embed_dropout = nn.Dropout(cfg.dropout)

  def patchify(self, signal: Array) -> Array:
    """[B, P, W] -> [B, P, T, L]."""
    b, p, w = signal.shape
    if p != self.cfg.num_parcels or w != self.cfg.window:
      raise ValueError(f"signal has {p} parcels x {w} timepoints; the model expects "
                       f"{self.cfg.num_parcels} x {self.cfg.window}")
    return signal.reshape(b, p, w // self.cfg.patch_len, self.cfg.patch_len)

  def encode(self, signal: Array, coords: Array | None, masking: Masking, *,
             train: bool = False) -> Array:
    """signal [B, P, W], coords [P, 3] | None -> latent [B, 1 + K, D] (CLS first)."""
    cfg = self.cfg
    patches = self.patchify(signal).astype(cfg.dtype)
    b, p, t, _ = patches.shape
    x = self.patch_embed(patches)  # [B, P, T, D]
    x = x + self.spatial(coords)[None, :, None, :]
    x = x + jnp.asarray(sinusoid_table(t, cfg.hidden_size), cfg.dtype)[None, None]
    x = x.reshape(b, p * t, cfg.hidden_size)
    x = jnp.take_along_axis(x, masking.ids_keep[..., None], axis=1)  # [B, K, D]
    cls = jnp.broadcast_to(jnp.asarray(self.cls, cfg.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    x = self.embed_dropout(x, deterministic=not train)
    return self.encoder(x, not train)

  def decode(self, latent: Array, coords: Array | None, masking: Masking, *,
             train: bool = False) -> Array:
    """latent [B, 1 + K, D] -> predicted patches [B, P, T, L] for every token."""
    cfg = self.cfg
    b, p, t = masking.mask.shape
    e = cfg.decoder_hidden_size
    cls, grid = decoder_tokens(self, latent, masking, p * t)
    grid = grid.reshape(b, p, t, e) + self.decoder_spatial(coords)[None, :, None, :]
    grid = grid + jnp.asarray(sinusoid_table(t, e), cfg.dtype)[None, None]
    x = jnp.concatenate([cls, grid.reshape(b, p * t, e)], axis=1)
    x = self.decoder(x, not train)
    y = nn.leaky_relu(self.head_hidden(x[:, 1:]), negative_slope=0.1)
    return self.head_out(y).reshape(b, p, t, cfg.patch_len).astype(jnp.float32)

  def reconstruct(self, signal: Array, coords: Array | None, masking: Masking) -> tuple[Array, Array]:
    """In the signal's own layout (what every variant returns for evaluation): (pred [B, P, W]
    float32, mask [B, P, W], 1 where the value's token was masked)."""
    pred, _ = self(signal, coords, masking)
    b, p, w = signal.shape
    return pred.reshape(b, p, w), jnp.repeat(masking.mask, self.cfg.patch_len, axis=-1)


def masked_loss(pred: Array, signal_patches: Array, mask: Array, kind: str = "mse",
                live: Array | None = None) -> Array:
  """Mean error over masked tokens only. pred/target [B, P, T, L], mask [B, P, T] (1 = masked);
  live [B, P]: 0 for a recording's constant ("dead") parcels, which are left out."""
  err = pred - signal_patches.astype(jnp.float32)
  err = jnp.square(err) if kind == "mse" else jnp.abs(err)
  if kind not in ("mse", "mae"):
    raise ValueError(f"loss={kind!r}; expected 'mse' or 'mae'")
  per_token = err.mean(-1)
  if live is not None:
    mask = mask * live[:, :, None].astype(mask.dtype)
  return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))

