"""Scaled dot-product attention: XLA, cuDNN, pure-JAX blockwise and a Pallas TPU kernel.

All public functions use the ``[batch, seq, heads, head_dim]`` layout of
``jax.nn.dot_product_attention``.  No masks, bias or dropout are supported
(BrainLM attends over every token).  The softmax scale is ``1/sqrt(head_dim)``.

Implementations:

* ``'xla'``       -- ``jax.nn.dot_product_attention(..., implementation='xla')``;
                     materialises the ``[B, H, Lq, Lk]`` logits/probabilities.
* ``'cudnn'``     -- ``jax.nn.dot_product_attention(..., implementation='cudnn')``
                     (GPU flash attention, fp16/bf16 only). cuDNN's training kernels take
                     only sequence lengths that are multiples of 64 (JAX 0.11: 'Unsupported
                     sequence length Q 849, KV 849' when the backward pass is traced), so
                     other lengths are zero-padded up to one and masked with
                     ``query_seq_lengths`` / ``key_value_seq_lengths`` (849 -> 896,
                     4241 -> 4288), and the padded rows are sliced off.
* ``'blockwise'`` -- pure-JAX flash attention: query tiles (``lax.map``) x key
                     tiles (``lax.scan``) with an online softmax in float32 and a
                     ``jax.custom_vjp`` backward that recomputes each probability
                     tile from the saved log-sum-exp.  Peak memory is
                     ``O(B*H*(block_q*block_k + L*D))`` in forward *and* backward.
* ``'pallas_tpu'`` -- the Pallas TPU splash-attention kernels of JAX
                     (``jax.experimental.pallas.ops.tpu.splash_attention``: forward, dq and
                     dkv kernels, custom VJP; MaxText's full-attention kernel), TPU only
                     (on CPU: ``interpret=True`` or ``pltpu.force_tpu_interpret_mode()``).
                     Sequences are zero-padded to tiles of <= ``PALLAS_TPU_MAX_BLOCK`` rows
                     that are multiples of 128 (4241 -> 9 x 512, 1061 -> 3 x 384), padded
                     keys are masked by a static splash mask, padded query rows sliced off.
                     Head dims are used as they are (32, 64, 80 compile for v5e).  Under a
                     mesh it runs in ``jax.shard_map``: batch over ('data', 'fsdp'), heads
                     over 'tensor' (see ``pallas_tpu_attention``).
* ``'auto'``      -- by the platform traced for: that of the mesh set with ``jax.set_mesh``
                     when there is one (compile-only TPU devices on a CPU host count as TPU),
                     else ``jax.default_backend()``.  TPU: ``'pallas_tpu'`` for fp32/bf16;
                     GPU: ``'cudnn'`` for supported fp16/bf16 inputs; CPU: ``'blockwise'`` at
                     every length (faster than ``'xla'`` there even at 201 tokens:
                     ``benchmarks/attention.py``); otherwise ``'blockwise'`` when
                     ``q_len * kv_len > AUTO_BLOCKWISE_MIN_ELEMENTS``, else ``'xla'``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

__all__ = [
    "AUTO_BLOCKWISE_MIN_ELEMENTS",
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "PALLAS_TPU_MAX_BLOCK",
    "attention_weights",
    "blockwise_attention",
    "dot_product_attention",
    "padded_attention",
    "pallas_tpu_attention",
    "resolve_implementation",
]

# Chosen with benchmarks/attention.py on 2 CPU cores (B=8, L=4241, H=4, D=64, fp32, fwd+bwd):
# 512 x 4096 (-> 9 x 2 tiles of 472 x 2128) was the fastest tiling measured (time ~0.45-0.5x of
# 'xla') with ~0.08x its XLA temp memory; smaller tiles save little memory and run slower.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 4096
# 'auto' off CPU and GPU switches from 'xla' to 'blockwise' above this many logits per
# (batch, head). On CPU 'blockwise' won at every length measured (2 cores, B=8, H=4, D=64, fp32,
# fwd+bwd, time vs 'xla': 0.89x at 201 tokens, 0.79x at 513, 0.55x at 849; the 13m train step
# 22.3 s instead of 25.4 s with 12% less peak memory), because XLA:CPU does not fuse the
# materialised softmax and its backward.
AUTO_BLOCKWISE_MIN_ELEMENTS = 1024 * 1024

_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise", "pallas_tpu")
CUDNN_SEQ_MULTIPLE = 64
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


# --------------------------------------------------------------------------- helpers


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _tile_size(length: int, block: int) -> int:
  """Tile size <= ``block`` that covers ``length`` with the fewest tiles and least padding.

  E.g. length 4241, block 512 -> 9 tiles of 472 (pad to 4248) rather than 9 x 512 (4608).
  """
  if block <= 0:
    raise ValueError(f"block size must be positive, got {block}")
  if length <= block:
    return length
  n = _cdiv(length, block)
  return min(block, _cdiv(_cdiv(length, n), 8) * 8)  # balanced, rounded up to a multiple of 8


def _scale(head_dim: int) -> float:
  return 1.0 / math.sqrt(head_dim)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"expected 4-D [batch, seq, heads, head_dim] inputs, got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q {q.shape} incompatible with k/v {k.shape} (batch, heads, head_dim must match)")
  if k.shape[1] == 0:
    raise ValueError("kv_len must be >= 1")


# --------------------------------------------------------------------------- blockwise core
#
# The core works on padded, head-major arrays: q [B, H, Lqp, D], k/v [B, H, Lkp, D], with
# Lqp = nq * bq and Lkp = nk * bk.  Keys at positions >= kv_len are padding and are masked.
# Batch and head axes are never merged, so sharding along them propagates unchanged.


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, H, n*block, ...] -> [n, B, H, block, ...] (loop axis first)."""
  b, h, length = x.shape[:3]
  x = x.reshape((b, h, length // block, block) + x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _from_blocks(x: jax.Array) -> jax.Array:
  """[n, B, H, block, ...] -> [B, H, n*block, ...]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _masked_logits(qi, kj, j, scale, kv_len, bk):
  """Float32 logits tile [B, H, bq, bk]; padded keys -> -inf."""
  s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
  if kv_len % bk:  # only the last key tile holds padding, but a per-tile select is cheap
    valid = j * bk + lax.iota(jnp.int32, bk) < kv_len
    s = jnp.where(valid, s, -jnp.inf)
  return s


def _flash_forward(q, k, v, kv_len, bq, bk):
  """Returns out [B, H, Lqp, D] (q.dtype) and lse [B, H, Lqp] (float32)."""
  d = q.shape[-1]
  scale = _scale(d)
  kb, vb = _to_blocks(k, bk), _to_blocks(v, bk)
  js = jnp.arange(kb.shape[0], dtype=jnp.int32)

  def one_query_block(qi):
    def step(carry, xs):
      m, l, acc = carry
      kj, vj, j = xs
      s = _masked_logits(qi, kj, j, scale, kv_len, bk)
      m_new = jnp.maximum(m, s.max(axis=-1))
      # Every key tile holds >= 1 real key, so m_new is finite; guard anyway (-inf - -inf).
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + p.sum(axis=-1)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vj.dtype), vj,
                      preferred_element_type=jnp.float32)
      return (m_new, l, alpha[..., None] * acc + pv), None

    # *_like keeps the (explicit-mode) sharding of qi on the scan carries.
    row = jnp.zeros_like(qi[..., 0], dtype=jnp.float32)
    init = (jnp.full_like(row, -jnp.inf), row, jnp.zeros_like(qi, dtype=jnp.float32))
    (m, l, acc), _ = lax.scan(step, init, (kb, vb, js))
    out = (acc / l[..., None]).astype(q.dtype)
    return out, m + jnp.log(l)

  out, lse = lax.map(one_query_block, _to_blocks(q, bq))
  return _from_blocks(out), _from_blocks(lse)


def _flash_backward(q, k, v, out, lse, dout, kv_len, bq, bk):
  """Flash-attention-2 style backward; outer scan over key tiles, inner scan over query tiles."""
  d = q.shape[-1]
  scale = _scale(d)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, H, Lqp]
  qb, dob = _to_blocks(q, bq), _to_blocks(dout, bq)
  lseb, deltab = _to_blocks(lse, bq), _to_blocks(delta, bq)
  kb, vb = _to_blocks(k, bk), _to_blocks(v, bk)
  js = jnp.arange(kb.shape[0], dtype=jnp.int32)

  def key_block(dq_blocks, xs):
    kj, vj, j = xs

    def query_block(carry, ys):
      dk, dv = carry
      qi, doi, lsei, deltai, dqi = ys
      s = _masked_logits(qi, kj, j, scale, kv_len, bk)
      p = jnp.exp(s - lsei[..., None])  # exact probabilities; padded keys -> 0
      dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(doi.dtype), doi,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - deltai[..., None])  # d(logits) / scale
      dqi = dqi + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(kj.dtype), kj,
                             preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(qi.dtype), qi,
                           preferred_element_type=jnp.float32)
      return (dk, dv), dqi

    zeros = jnp.zeros_like(kj, dtype=jnp.float32)
    (dk, dv), dq_blocks = lax.scan(query_block, (zeros, zeros),
                                   (qb, dob, lseb, deltab, dq_blocks))
    return dq_blocks, (dk, dv)

  dq0 = jnp.zeros_like(qb, dtype=jnp.float32)
  dq_blocks, (dkb, dvb) = lax.scan(key_block, dq0, (kb, vb, js))
  dq = (_from_blocks(dq_blocks) * scale).astype(q.dtype)
  dk = (_from_blocks(dkb) * scale).astype(k.dtype)
  dv = _from_blocks(dvb).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, kv_len, bq, bk):
  return _flash_forward(q, k, v, kv_len, bq, bk)[0]


def _flash_fwd(q, k, v, kv_len, bq, bk):
  out, lse = _flash_forward(q, k, v, kv_len, bq, bk)
  return out, (q, k, v, out, lse)


def _flash_bwd(kv_len, bq, bk, res, dout):
  q, k, v, out, lse = res
  return _flash_backward(q, k, v, out, lse, dout, kv_len, bq, bk)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """Memory-efficient (flash-style) attention in pure JAX.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
    block_q, block_k: maximum tile sizes; actual tiles are balanced to minimise padding
      (see ``_tile_size``).  Ragged lengths are zero-padded; padded keys are masked and
      padded query rows are sliced off.
  Returns:
    [batch, q_len, heads, head_dim] in q.dtype.  Softmax statistics and accumulators are
    float32.  Forward and backward never hold more than one [B, H, bq, bk] tile of logits.
  """
  _check_shapes(q, k, v)
  q_len, kv_len = q.shape[1], k.shape[1]
  bq, bk = _tile_size(q_len, block_q), _tile_size(kv_len, block_k)
  pad_q, pad_k = _cdiv(q_len, bq) * bq - q_len, _cdiv(kv_len, bk) * bk - kv_len
  # [B, L, H, D] -> [B, H, L, D] so the tile matmuls have (batch, heads) as leading batch dims.
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  if pad_q:
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad_q), (0, 0)))
  if pad_k:
    kt = jnp.pad(kt, ((0, 0), (0, 0), (0, pad_k), (0, 0)))
    vt = jnp.pad(vt, ((0, 0), (0, 0), (0, pad_k), (0, 0)))
  out = _flash(qt, kt, vt, kv_len, bq, bk)
  return jnp.swapaxes(out[:, :, :q_len], 1, 2)


# --------------------------------------------------------------------------- Pallas TPU (splash)

# Largest splash tile (query rows, key rows per grid step): MaxText's default. Tiles are multiples
# of 128, the TPU lane width, which splash requires of every block.
PALLAS_TPU_MAX_BLOCK = 512
_TPU_LANES = 128
_PALLAS_TPU_DTYPES = (jnp.float32, jnp.bfloat16)
# Mesh axes (brainlm_jax/training/sharding.py) that 'pallas_tpu' maps batch and heads over.
_BATCH_MESH_AXES = ("data", "fsdp")
_HEADS_MESH_AXIS = "tensor"


def _pallas_tile(length: int, max_block: int) -> int:
  """Fewest tiles of <= ``max_block`` rows covering ``length``, balanced, rounded up to 128.

  201 -> 256 (1 tile), 1061 -> 384 (3 tiles: 1152), 3393 -> 512 (7: 3584), 4241 -> 512 (9: 4608).
  """
  n = _cdiv(length, max_block)
  return _cdiv(_cdiv(length, n), _TPU_LANES) * _TPU_LANES


@functools.lru_cache(maxsize=None)
def _splash():
  """The Pallas TPU splash-attention module and our key-padding mask class, imported on first
  use (not at start-up: only TPU runs and interpret-mode tests need them)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass(frozen=True)
  class KeyPaddingMask(splash.Mask):
    """Lazy splash mask of shape ``[q_len, kv_len]``: key ``j`` is visible iff ``j < valid``.

    Static, so splash skips masking in full blocks and only the last key block is partial.
    """
    size: tuple[int, int]
    valid: int

    @property
    def shape(self) -> tuple[int, int]:
      return self.size

    def __getitem__(self, idx) -> np.ndarray:
      rows, cols = idx
      n_rows = len(range(self.size[0])[rows])
      visible = np.arange(self.size[1])[cols] < self.valid
      return np.broadcast_to(visible, (n_rows, visible.size)).copy()

  return splash, KeyPaddingMask


def _pallas_tpu_local(q, k, v, *, max_block, interpret):
  """Splash attention on unsharded arrays, [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]."""
  splash, key_padding_mask = _splash()
  (b, q_len, h, d), kv_len = q.shape, k.shape[1]
  bq, bk = _pallas_tile(q_len, max_block), _pallas_tile(kv_len, max_block)
  q_pad, kv_pad = _cdiv(q_len, bq) * bq, _cdiv(kv_len, bk) * bk

  def heads_major(x, length):  # [B, L, H, D] -> [B * H, length, D], zero-padded
    x = jnp.swapaxes(x.astype(q.dtype), 1, 2)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
    return x.reshape(b * h, length, d)

  sizes = splash.BlockSizes(
      block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
      block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = splash.MultiHeadMask([key_padding_mask((q_pad, kv_pad), kv_len)] * (b * h))
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  # Splash takes no softmax scale: 1/sqrt(head_dim) is folded into q, in float32.
  q = (q.astype(jnp.float32) * _scale(d)).astype(q.dtype)
  out = kernel(heads_major(q, q_pad), heads_major(k, kv_pad), heads_major(v, kv_pad))
  return jnp.swapaxes(out.reshape(b, h, q_pad, d)[:, :, :q_len], 1, 2)


def _mesh_axes(mesh, batch: int, heads: int) -> tuple[tuple[str, ...], str | None]:
  """Axes of ``mesh`` to split batch and heads over: those of ('data', 'fsdp') and 'tensor' that
  exist, are not already manual, have > 1 device and divide the batch / number of heads."""
  if mesh.empty:
    return (), None
  sizes = {name: size for name, size in zip(mesh.axis_names, mesh.axis_sizes)
           if size > 1 and name not in mesh.manual_axes}
  batch_axes, split = [], 1
  for name in _BATCH_MESH_AXES:
    if name in sizes and batch % (split * sizes[name]) == 0:
      batch_axes.append(name)
      split *= sizes[name]
  tensor = sizes.get(_HEADS_MESH_AXIS)
  head_axis = _HEADS_MESH_AXIS if tensor and heads % tensor == 0 else None
  return tuple(batch_axes), head_axis


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         max_block: int = PALLAS_TPU_MAX_BLOCK,
                         interpret=False) -> jax.Array:
  """Attention with the Pallas TPU splash kernel (forward and custom-VJP backward).

  Each sequence axis is zero-padded to a whole number of tiles (``_pallas_tile``), padded keys are
  masked by a static splash mask and padded query rows are sliced off, so values and gradients
  equal unpadded attention. Under a mesh (``jax.set_mesh``) the kernel runs in ``jax.shard_map``
  with batch over ('data', 'fsdp') and heads over 'tensor' (``_mesh_axes``): a ``pallas_call``
  cannot be partitioned by GSPMD.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
    max_block: largest tile, a multiple of 128.
    interpret: run the kernel on CPU: ``True`` (Pallas TPU interpret mode, which simulates TPU
      memory), a ``pltpu.InterpretParams``, or False (compile with Mosaic; TPU only).
      ``with pltpu.force_tpu_interpret_mode():`` does the same for every Pallas call it traces.
      (Under shard_map over 8 virtual CPU devices on 2 cores, TPU interpret mode hung; 4 ran.)
  Returns:
    [batch, q_len, heads, head_dim] in q.dtype (k, v are cast to it).
  """
  _check_shapes(q, k, v)
  if max_block <= 0 or max_block % _TPU_LANES:
    raise ValueError(f"max_block must be a positive multiple of {_TPU_LANES}, got {max_block}")
  if interpret is True:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    interpret = pltpu.InterpretParams()
  local = functools.partial(_pallas_tpu_local, max_block=max_block, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes, head_axis = _mesh_axes(mesh, q.shape[0], q.shape[2])
  if not batch_axes and head_axis is None:
    return local(q, k, v)
  spec = P(batch_axes or None, None, head_axis, None)
  # check_vma=False: splash's pallas_calls declare no per-axis variance of their outputs.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)


def _platform() -> str:
  """Platform being traced for: that of the devices of the mesh set by ``jax.set_mesh`` (e.g.
  compile-only TPU devices on a CPU host), else ``jax.default_backend()``."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


# --------------------------------------------------------------------------- public API


def resolve_implementation(q: jax.Array, k: jax.Array, implementation: str = "auto") -> str:
  """Concrete implementation ('xla' | 'cudnn' | 'blockwise' | 'pallas_tpu') that
  ``dot_product_attention`` uses; 'auto' decides by ``_platform()`` (see the module docstring).

  Args:
    q: [batch, q_len, heads, head_dim]; k: [batch, kv_len, heads, head_dim] (arrays or
      ``jax.ShapeDtypeStruct``s: only shapes and dtypes are read).
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  platform, head_dim = _platform(), q.shape[-1]
  if platform == "tpu" and q.dtype in _PALLAS_TPU_DTYPES:
    return "pallas_tpu"
  if (platform == "gpu" and q.dtype in _CUDNN_DTYPES and q.dtype == k.dtype
          and head_dim <= 128 and head_dim % 8 == 0):
    return "cudnn"
  if platform == "cpu" or q.shape[1] * k.shape[1] > AUTO_BLOCKWISE_MIN_ELEMENTS:
    return "blockwise"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
                          block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """Unmasked softmax attention, scale 1/sqrt(head_dim).

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
    implementation: 'xla' | 'cudnn' | 'blockwise' | 'pallas_tpu' | 'auto' (module docstring).
    block_q, block_k: tile sizes for 'blockwise' (ignored otherwise).
  Returns:
    [batch, q_len, heads, head_dim] in q.dtype.
  """
  _check_shapes(q, k, v)
  impl = resolve_implementation(q, k, implementation)
  if impl == "blockwise":
    return blockwise_attention(q, k, v, block_q=block_q, block_k=block_k)
  if impl == "pallas_tpu":
    return pallas_tpu_attention(q, k, v)
  if impl == "cudnn" and implementation == "auto":
    # Unsupported cuDNN setups that fail at trace time fall back rather than erroring.
    try:
      return padded_attention(q, k, v, implementation="cudnn")
    except Exception:  # noqa: BLE001
      impl = "blockwise" if q.shape[1] * k.shape[1] > AUTO_BLOCKWISE_MIN_ELEMENTS else "xla"
      return dot_product_attention(q, k, v, implementation=impl, block_q=block_q, block_k=block_k)
  if impl == "cudnn":
    return padded_attention(q, k, v, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "cudnn",
                     multiple: int = CUDNN_SEQ_MULTIPLE) -> jax.Array:
  """``jax.nn.dot_product_attention`` with both sequence axes zero-padded to a multiple of
  `multiple` and the padding masked (``query_seq_lengths``, ``key_value_seq_lengths``); the
  padded query rows are sliced off, so the result (and its gradients) equal unpadded attention.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
  Returns:
    [batch, q_len, heads, head_dim] in q.dtype.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  q_pad, kv_pad = (-q_len) % multiple, (-kv_len) % multiple
  if not q_pad and not kv_pad:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  widths = lambda n: ((0, 0), (0, n), (0, 0), (0, 0))  # noqa: E731
  batch = q.shape[0]
  out = jax.nn.dot_product_attention(
      jnp.pad(q, widths(q_pad)), jnp.pad(k, widths(kv_pad)), jnp.pad(v, widths(kv_pad)),
      query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
      key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32),
      implementation=implementation)
  return out[:, :q_len]


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """Softmax attention probabilities (materialised; for attention maps / small inputs).

  Args:
    q: [batch, q_len, heads, head_dim]; k: [batch, kv_len, heads, head_dim].
  Returns:
    [batch, heads, q_len, kv_len] in q.dtype; computed in float32, rows sum to 1.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * _scale(q.shape[-1]), axis=-1).astype(q.dtype)
