"""BrainLM's released `brainlm_mae` network: model.BrainLM with Nystromformer layers.

The embeddings, decoder and head are model.BrainLM's, whose math is the original's: token =
Dense(L->D)(patch) + Dense(3->D)(xyz * coord_scale) + sinusoid(time patch); CLS + visible
tokens; Dense(D->E), mask tokens, decoder XYZ + time embeddings; head Dense(E->E/2) ->
LeakyReLU(0.1) -> Dense(E/2->L). Only the layers differ: post-LN (BERT style), erf GELU,

  x = LN(x + Out(attention(Qx, Kx, Vx) + conv(Vx)))           [B, S, D]
  x = LN(x + Dense(gelu(Dense(x))))

attention is exact softmax(QK^T / sqrt(d)) V when num_landmarks == segment_means_seq_len (the
released config: 64 == 64), else the Nystrom approximation (Xiong et al., 2021) with
`num_landmarks` segment-mean landmarks and a 6-step iterative pseudo-inverse, as Hugging Face's
NystromformerSelfAttention. conv is a per-head depthwise convolution of the values along the
sequence (kernel conv_kernel_size, zero padding) when conv_kernel_size > 0.

Token order matters here (landmarks and the convolution run along the sequence): BrainLM fed the
visible tokens in its random-shuffle order; `Masking.ids_keep` is used in the order given.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from brainlm_jax.models.brainlm import Block, BrainLM, SelfAttention, Transformer
from brainlm_jax.models.brainlm import attend
from brainlm_jax.models.brainlm import attention_inputs, layer_norm
from brainlm_jax.models.brainlm import mlp, output_projection

Array = jax.Array

__all__ = ["BrainLMNystrom", "NystromLayer", "NystromTransformer", "depthwise_conv",
           "iterative_pinv", "nystrom_attention", "segment_means"]


def segment_means(x: Array, num_segments: int) -> Array:
  """[B, S, H, d] -> [B, num_segments, H, d]: means of consecutive equal segments."""
  b, s, h, d = x.shape
  if s % num_segments:
    raise ValueError(f"Nystrom attention: sequence length {s} is not divisible by "
                     f"num_landmarks={num_segments}")
  return x.reshape(b, num_segments, s // num_segments, h, d).mean(axis=2)


def iterative_pinv(m: Array, n_iter: int = 6) -> Array:
  """Approximate Moore-Penrose inverse of softmax matrices m [..., L, L] (Razavi et al.).

  Z0 = m^T / max(column sums of m), the max taken over the whole array as the original does.
  """
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)
  z = jnp.swapaxes(m, -1, -2) / jnp.max(jnp.sum(m, axis=-2))
  for _ in range(n_iter):
    mz = m @ z
    z = (0.25 * z) @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
  return z


def nystrom_attention(q: Array, k: Array, v: Array, num_landmarks: int) -> Array:
  """Nystrom approximation of softmax attention. q, k, v [B, S, H, d] -> [B, S, H, d]."""
  scale = q.shape[-1] ** -0.25
  q, k = q * scale, k * scale
  ql, kl = segment_means(q, num_landmarks), segment_means(k, num_landmarks)
  kernel_1 = jax.nn.softmax(jnp.einsum("bshd,blhd->bhsl", q, kl), axis=-1)
  kernel_2 = jax.nn.softmax(jnp.einsum("blhd,bmhd->bhlm", ql, kl), axis=-1)
  kernel_3 = jax.nn.softmax(jnp.einsum("blhd,bshd->bhls", ql, k), axis=-1)
  landmark_values = jnp.einsum("bhls,bshd->bhld", kernel_3, v)
  probs = kernel_1 @ iterative_pinv(kernel_2)
  return jnp.einsum("bhsl,bhld->bshd", probs, landmark_values)


def depthwise_conv(v: Array, kernel: Array) -> Array:
  """Per-head 1-D convolution along the sequence, zero padded. v [B, S, H, d], kernel [H, k]
  (k odd) -> [B, S, H, d]."""
  h, width = kernel.shape
  if width % 2 == 0:
    raise ValueError(f"conv_kernel_size={width} must be odd")
  out = jax.lax.conv_general_dilated(
      jnp.transpose(v, (0, 2, 1, 3)), kernel[:, None, :, None].astype(v.dtype),
      window_strides=(1, 1), padding=((width // 2, width // 2), (0, 0)),
      feature_group_count=h, precision=jax.lax.Precision.HIGHEST)
  return jnp.transpose(out, (0, 2, 1, 3))


class NystromSelfAttention(SelfAttention):
  """Nystromformer self-attention (+ value convolution), [B, S, D] -> [B, S, D]."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    q, k, v = attention_inputs(self, x, self.num_heads)
    if cfg.num_landmarks in (0, cfg.segment_means_seq_len):
      out = attend(cfg, q, k, v)
    else:
      out = nystrom_attention(q, k, v, cfg.num_landmarks)
    if cfg.conv_kernel_size:
      kernel = self.param(
          "conv", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", None)),
          (self.num_heads, cfg.conv_kernel_size), cfg.param_dtype)
      out = out + depthwise_conv(v, jnp.asarray(kernel, cfg.dtype))
    return output_projection(cfg, out, x.shape[-1])


class NystromLayer(Block):
  """Post-LN Nystromformer layer, [B, S, D] -> [B, S, D] (Block's fields, returns x alone)."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    y = NystromSelfAttention(cfg, self.num_heads, name="attention")(x)
    x = layer_norm(cfg, "ln_attention")(x + nn.Dropout(cfg.dropout)(y, deterministic))
    y = mlp(cfg, x, self.mlp_dim)
    return layer_norm(cfg, "ln_mlp")(x + nn.Dropout(cfg.dropout)(y, deterministic))


class NystromTransformer(Transformer):
  """`num_layers` NystromLayers then a LayerNorm (Transformer's fields and parameter names)."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if self.cfg.scan_layers:
      raise ValueError("model.scan_layers is not supported by variant 'brainlm_nystrom'")
    for i in range(self.num_layers):
      x = NystromLayer(self.cfg, self.num_heads, self.mlp_dim, name=f"layer_{i}")(
          x, deterministic)
    return layer_norm(self.cfg, "ln_final")(x)


class BrainLMNystrom(BrainLM):
  """model.BrainLM with Nystromformer layers: BrainLM's released `brainlm_mae` model."""
  transformer_cls = NystromTransformer
