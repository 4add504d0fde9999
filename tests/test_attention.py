"""Tests for brainlm_jax.models.attention (CPU, fast)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec

from brainlm_jax.models import attention as attn


def _qkv(q_len, kv_len, batch=2, heads=3, dim=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)  # numpy inputs: no per-shape compilation
    q = rng.standard_normal((batch, q_len, heads, dim), np.float32)
    k = rng.standard_normal((batch, kv_len, heads, dim), np.float32)
    v = rng.standard_normal((batch, kv_len, heads, dim), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@jax.jit
def _reference(q, k, v):
    """Plain fp32 softmax attention, [B, Lq, H, D]."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _attn_fn(impl, **kw):
    return jax.jit(lambda q, k, v: attn.dot_product_attention(q, k, v, implementation=impl, **kw))


@pytest.mark.parametrize("q_len,kv_len", [(37, 53), (53, 37), (32, 48)])  # ragged + exact tiles
def test_blockwise_matches_xla_forward_and_grads(q_len, kv_len):
    q, k, v = _qkv(q_len, kv_len)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    xla = _attn_fn("xla")
    blockwise = _attn_fn("blockwise", block_q=16, block_k=16)

    np.testing.assert_allclose(blockwise(q, k, v), xla(q, k, v), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(xla(q, k, v), _reference(q, k, v), atol=1e-5, rtol=1e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    g_ref = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    g_blk = jax.jit(jax.grad(loss(blockwise), argnums=(0, 1, 2)))(q, k, v)
    for name, gr, gb in zip("qkv", g_ref, g_blk):
        np.testing.assert_allclose(gb, gr, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_blockwise_tile_sizes_are_balanced():
    assert attn._tile_size(37, 512) == 37  # pylint: disable=protected-access
    assert attn._tile_size(4241, 512) == 472  # 9 tiles, 7 padded rows  # pylint: disable=protected-access
    for length, block in [(37, 16), (53, 16), (4241, 1024), (100, 7)]:
        tile = attn._tile_size(length, block)  # pylint: disable=protected-access
        assert tile <= block
        assert math.ceil(length / tile) == math.ceil(length / block)


def test_blockwise_bf16():
    q, k, v = _qkv(37, 53, dtype=jnp.bfloat16)
    out = _attn_fn("blockwise", block_q=16, block_k=16)(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v), atol=2e-2, rtol=2e-2)

    grads = jax.jit(jax.grad(lambda q, k, v: attn.blockwise_attention(q, k, v, block_q=16, block_k=16)
                             .astype(jnp.float32).sum(), argnums=(0, 1, 2)))(q, k, v)
    grads_ref = jax.jit(jax.grad(lambda q, k, v: _reference(q, k, v).sum(), argnums=(0, 1, 2)))(q, k, v)
    for gb, gr in zip(grads, grads_ref):
        assert gb.dtype == jnp.bfloat16
        np.testing.assert_allclose(gb.astype(jnp.float32), gr, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("q_len", [24, 1100])
def test_auto_on_cpu(q_len, monkeypatch):
    q, k, v = _qkv(q_len, q_len - 1, batch=1, heads=1, dim=8)
    assert attn.resolve_implementation(q, k, "auto") == "blockwise"  # CPU: blockwise at any length
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attn.resolve_implementation(q, k, "auto") == "pallas_tpu"  # TPU: float32 / bfloat16
    # Other dtypes there (and other platforms): the plain XLA path below
    # AUTO_BLOCKWISE_MIN_ELEMENTS logits.
    big = q_len * (q_len - 1) > attn.AUTO_BLOCKWISE_MIN_ELEMENTS
    q16, k16 = q.astype(jnp.float16), k.astype(jnp.float16)
    assert attn.resolve_implementation(q16, k16, "auto") == ("blockwise" if big else "xla")
    monkeypatch.undo()
    out = _attn_fn("auto")(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, _reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_auto_prefers_cudnn_on_gpu_and_falls_back(monkeypatch):
    q, k, v = _qkv(24, 24, dim=64, dtype=jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn.resolve_implementation(q, k, "auto") == "cudnn"
    assert attn.resolve_implementation(q.astype(jnp.float32), k, "auto") == "xla"  # fp32: no cuDNN flash
    # On this CPU-only host cuDNN fails at trace time; 'auto' must fall back instead of raising.
    out = attn.dot_product_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q_len,kv_len", [(49, 49), (37, 70), (64, 64)])
def test_padded_attention_equals_unpadded_values_and_grads(q_len, kv_len):
    # The path cuDNN takes at lengths that are not multiples of 64 (the encoder's 849, the
    # decoder's 4241): zero-pad, mask by sequence lengths, slice. Checked through XLA here.
    q, k, v = _qkv(q_len, kv_len)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    padded = lambda q, k, v: attn.padded_attention(q, k, v, implementation="xla", multiple=64)
    loss = lambda f: lambda q, k, v: (f(q, k, v) * ct).sum()
    np.testing.assert_allclose(padded(q, k, v), _reference(q, k, v), atol=1e-5, rtol=1e-5)
    got = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_invalid_implementation():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError):
        attn.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_weights(dtype):
    q, k, _ = _qkv(9, 13, dtype=dtype)
    w = jax.jit(attn.attention_weights)(q, k)
    assert w.shape == (2, 3, 9, 13) and w.dtype == dtype
    w = w.astype(jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=tol * 10)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    expected = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
    np.testing.assert_allclose(w, expected, atol=tol)


def _grad_temp_bytes(impl, q, k, v, **blocks):
    fn = jax.grad(lambda q, k, v: attn.dot_product_attention(q, k, v, implementation=impl, **blocks).sum(),
                  argnums=(0, 1, 2))
    mem = jax.jit(fn).lower(q, k, v).compile().memory_analysis()  # compile only; nothing is run
    if mem is None:
        pytest.skip("memory_analysis unavailable on this backend")
    return mem.temp_size_in_bytes


def test_blockwise_grad_memory_well_below_xla():
    q, k, v = _qkv(2048, 2048, batch=1, heads=2, dim=32)
    xla_bytes = _grad_temp_bytes("xla", q, k, v)
    # xla holds several [B, H, L, L] fp32 buffers (32 MiB each here).
    assert xla_bytes >= 2 * 2048 * 2048 * 4
    tiled = _grad_temp_bytes("blockwise", q, k, v, block_q=512, block_k=1024)
    assert tiled < xla_bytes / 4, (tiled, xla_bytes)
    # Default tiles (block_k >= 2048 -> one key tile of [512, 2048]) still save well over half.
    default = _grad_temp_bytes("blockwise", q, k, v)
    assert default < xla_bytes / 2, (default, xla_bytes)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs >= 2 devices "
                    "(e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2)")
@pytest.mark.parametrize("spec", [("data",), (None, None, "data")])  # shard batch / heads
def test_blockwise_sharded_batch_and_heads(spec):
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

    mesh = jax.make_mesh((2,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    q, k, v = (jax.device_put(x, sharding) for x in _qkv(37, 53, batch=2, heads=2))
    grad = jax.jit(jax.grad(lambda q, k, v: attn.blockwise_attention(q, k, v, block_q=16, block_k=16).sum(),
                            argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        hlo = grad.lower(q, k, v).compile().as_text()
        grads = grad(q, k, v)
    assert "all-gather" not in hlo and "all-to-all" not in hlo  # no resharding of batch/heads
    ref = jax.jit(jax.grad(lambda q, k, v: _reference(q, k, v).sum(), argnums=(0, 1, 2)))(
        *(jax.device_get(x) for x in (q, k, v)))
    for gb, gr in zip(grads, ref):
        assert gb.sharding.spec[:len(spec)] == PartitionSpec(*spec)[:len(spec)]
        np.testing.assert_allclose(np.asarray(gb), np.asarray(gr), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- 'pallas_tpu' (splash)
# On CPU the kernels run in Pallas' TPU interpret mode; compiled for TPU at the end (libtpu only).


def _out_and_grads(fn, q, k, v, cot):
    """fn(q, k, v) and the gradients of <fn(q, k, v), cot> w.r.t. q, k, v."""
    def run(q, k, v, cot):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot.astype(out.dtype))
    return jax.jit(run)(q, k, v, cot)


@pytest.mark.parametrize("dtype,q_len,kv_len,max_block,tol", [
    (jnp.float32, 201, 201, 512, 1e-5),   # one ragged tile: 201 -> 256
    (jnp.float32, 130, 300, 128, 1e-5),   # several tiles: q 2 x 128, kv 3 x 128 (84 padded keys)
    (jnp.bfloat16, 201, 201, 128, 2e-2),  # 2 x 128 (max error seen ~5e-3)
])
def test_pallas_tpu_interpret_matches_xla(dtype, q_len, kv_len, max_block, tol):
    q, k, v = _qkv(q_len, kv_len, batch=2, heads=2, dim=20, dtype=dtype)  # head_dim 20 (80 / 4)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    pallas = lambda q, k, v: attn.pallas_tpu_attention(  # noqa: E731
        q, k, v, max_block=max_block, interpret=True)
    out, grads = _out_and_grads(pallas, q, k, v, cot)
    # Reference: the same (bf16-rounded) inputs through 'xla' in float32.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = _out_and_grads(
        lambda q, k, v: attn.dot_product_attention(q, k, v, implementation="xla"), *f32, cot)
    assert out.shape == q.shape and out.dtype == dtype
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=tol, rtol=tol)
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        np.testing.assert_allclose(g.astype(jnp.float32), gr, atol=tol, rtol=tol,
                                   err_msg=f"d{name}")


@pytest.mark.skipif(jax.device_count() < 4, reason="needs >= 4 devices "
                    "(e.g. XLA_FLAGS=--xla_force_host_platform_device_count=4)")
def test_pallas_tpu_sharded_under_mesh_interpret():
    # Through the dispatcher, in shard_map over a (data=2, fsdp=1, tensor=2) CPU mesh; every
    # pallas_call traced under force_tpu_interpret_mode runs in TPU interpret mode. (4 devices:
    # on 8 virtual CPU devices sharing 2 cores TPU interpret mode under shard_map hung.)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2),
                             ("data", "fsdp", "tensor"))
    spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec))
               for x in _qkv(201, 201, batch=2, heads=2, dim=16))
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    with jax.set_mesh(mesh):
        assert attn.resolve_implementation(q, k) == "blockwise"  # the mesh's platform: CPU
        mesh_axes = attn._mesh_axes  # pylint: disable=protected-access
        assert mesh_axes(jax.sharding.get_abstract_mesh(), 2, 2) == (("data",), "tensor")
        with pltpu.force_tpu_interpret_mode():
            out, grads = _out_and_grads(
                lambda q, k, v: attn.dot_product_attention(q, k, v, implementation="pallas_tpu"),
                q, k, v, cot)
    ref_out, ref_grads = _out_and_grads(
        lambda q, k, v: attn.dot_product_attention(q, k, v, implementation="xla"),
        *(jax.device_get(x) for x in (q, k, v, cot)))
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for g, gr in zip(grads, ref_grads):
        assert g.sharding.spec[:3] == spec[:3]
        np.testing.assert_allclose(g, gr, atol=1e-5, rtol=1e-5)


def test_pallas_tpu_tiles_and_mesh_axes():
    tile = attn._pallas_tile  # pylint: disable=protected-access
    # Fewest tiles of <= 512 rows, multiples of 128: decoder 1 + 4240 tokens, encoder 1 + visible.
    assert [tile(n, 512) for n in (201, 1061, 3393, 4241)] == [256, 384, 512, 512]
    assert tile(300, 128) == 128 and tile(64, 512) == 128
    with pytest.raises(ValueError):
        attn.pallas_tpu_attention(*_qkv(8, 8), max_block=100)
    mesh_axes = attn._mesh_axes  # pylint: disable=protected-access
    mesh = jax.sharding.AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
    assert mesh_axes(mesh, 4, 16) == (("data",), "tensor")  # size-1 'fsdp' is left out
    assert mesh_axes(mesh, 3, 3) == ((), None)  # indivisible: replicated along those axes
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert mesh_axes(mesh, 8, 2) == (("data", "fsdp"), "tensor")
    assert mesh_axes(mesh, 2, 2) == (("data",), "tensor")
    assert mesh_axes(jax.sharding.AbstractMesh((4,), ("other",)), 4, 4) == ((), None)


@pytest.mark.parametrize("q_len,heads,head_dim,dtype", [
    (4241, 16, 32, jnp.bfloat16),  # decoder: 1 + 4240 tokens, 512 wide / 16 heads
    (1061, 4, 80, jnp.float32),    # encoder: 1 + 1060 visible tokens, 1280 / 16 (4 heads here)
])
def test_pallas_tpu_compiles_for_tpu_mesh(q_len, heads, head_dim, dtype):
    """'auto' picks the splash kernel for a mesh of compile-only TPU v5e devices on this CPU host,
    and jit(value_and_grad) of it lowers and compiles, batch and heads staying sharded."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    x = jax.ShapeDtypeStruct((4, q_len, heads, head_dim), dtype, sharding=sharding)

    def loss(q, k, v):
        return attn.dot_product_attention(q, k, v).astype(jnp.float32).sum()

    with jax.set_mesh(mesh):  # the mesh's devices decide 'auto', not jax.default_backend()
        assert attn.resolve_implementation(x, x, "auto") == "pallas_tpu"
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3  # splash fwd, dq, dkv kernels
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    _, grad_shardings = compiled.output_shardings
    for s in grad_shardings:
        assert s.is_equivalent_to(sharding, 4)
