"""Compiling for Cloud TPU slices on a CPU machine: topology names, HLO accounting, the abstract
state on compile-only devices, multi-slice meshes, bf16 by default, and `brainlm-bench --topology`.

The tests that compile need libtpu (the `.[tpu]` extra, part of `.[test]` on Linux); they skip
where it is missing."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainlm_jax.tools import hlo, tpu
from brainlm_jax.training import sharding, state as state_lib
from configs import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e '.[tpu]')")


@pytest.mark.parametrize("name,physical,chips,wrap", [
    # MaxText's accelerator_to_spec_map for the same names.
    ("v4-8", "v4:2x2x1", 4, (False, False, False)),
    ("v5e-16", "v5e:4x4", 16, (False, False, False)),
    ("v5e-256", "v5e:16x16", 256, (True, True, False)),
    ("v5p-64", "v5:2x4x4", 32, (False, False, False)),
    ("v5p-128", "v5:4x4x4", 64, (True, True, True)),
    ("v5p-256", "v5:4x4x8", 128, (True, True, True)),
    ("v6e-256", "v6e:16x16", 256, (True, True, False)),
    ("v5e:2x2", "v5e:2x2", 4, (False, False, False)),
])
def test_topology_names(name, physical, chips, wrap):
  s = tpu.parse_topology(name)
  assert (s.topology_name, s.chips, s.wrap) == (physical, chips, wrap)


def test_topology_errors_name_the_forms():
  with pytest.raises(ValueError, match="v5e-16"):
    tpu.parse_topology("tpu-16")
  with pytest.raises(ValueError, match="known"):
    tpu.parse_topology("v9-8")


def test_missing_tpu_compiler_is_one_clear_error(monkeypatch):
  from jax.experimental import topologies

  def refuse(**_):
    raise RuntimeError("no TPU plugin")

  monkeypatch.setattr(topologies, "get_topology_desc", refuse)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(tpu.TpuCompilerError, match=r"pip install -e '\.\[tpu\]'"):
    tpu.topology_devices("v5e-16")


_HLO = """HloModule m, is_scheduled=true

%cond (p: (s32[], f32[64,64])) -> pred[] {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  %c = s32[] constant(7)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p.1: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p.1 = (s32[], f32[64,64]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x = f32[64,64]{1,0} get-tuple-element(%p.1), index=1
  %d = f32[64,64]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i.1, %one)
  ROOT %t = (s32[], f32[64,64]{1,0}) tuple(%n, %d)
}

ENTRY %main (a: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[64,64]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[64,64]{1,0}) while(%t0), condition=%cond, body=%body
  %r = f32[64,64]{1,0} get-tuple-element(%w), index=1
  %ar = f32[64,64]{1,0} all-reduce(%r), replica_groups={{0,1,2,3}}, to_apply=%body
  %ag = f32[256,64]{1,0} all-gather(%ar), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %v = f32[64,64]{1,0:T(8,128)S(1)} add(%ar, %ar)
}
"""


def test_hlo_counts_loops_collectives_and_on_chip_buffers():
  s = hlo.analyse(_HLO, slice_of=lambda d: d // 2, num_devices=8)
  assert s.loops == [("body", 7)]
  assert s.flops == 7 * 2 * 64 ** 3  # the dot, 7 times
  size = 64 * 64 * 4
  # HBM: the dot (2 operands + result) 7 times, all-reduce, all-gather; the S(1) result of the
  # final add lives on chip, its two HBM operands are read.
  assert s.hbm_bytes == 7 * 3 * size + 2 * size + (4 * size + size) + 2 * size
  assert s.collectives["all-reduce"]["bytes"] == pytest.approx(2 * 3 / 4 * size)
  assert s.collectives["all-gather"]["bytes"] == pytest.approx(3 / 4 * 4 * size)
  # {0,1,2,3} spans slices 0 and 1 (2 devices a slice): over DCN; [2,4]<=[8] groups too.
  assert s.collectives["all-reduce"]["dcn_bytes"] == s.collectives["all-reduce"]["bytes"]


def test_hlo_counts_multislice_all_reduce_over_dcn():
  """Multi-slice programs reduce across slices with host-transfer sends to the Megascale
  runtime: 2 slices all-reduce a 64 KiB f32 gradient shard -> (2-1)/2 x 2 x 64 KiB sent."""
  text = """HloModule m
ENTRY %e (g: f32[128,128]) -> f32[128,128] {
  %g = f32[128,128]{1,0} parameter(0)
  %t = token[] after-all()
  %s = (f32[128,128]{1,0}, u32[], token[]) send(%g, %t), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[128,128]{1,0} copy(%g)
}
"""
  s = hlo.analyse(text, slice_of=lambda d: d // 4, num_devices=8)
  assert s.collectives["dcn all-reduce"]["dcn_bytes"] == 128 * 128 * 4
  assert s.dcn_bytes == s.collective_bytes


def test_hlo_loop_counter_steps():
  """XLA's windowed (FSDP) matmul loops count by 2: 'counter < 7' in steps of 2 runs 4 times."""
  s = hlo.analyse(_HLO.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)"))
  assert s.loops == [("body", 4)] and s.flops == 4 * 2 * 64 ** 3


def test_hlo_counts_windowed_matmul_convolutions_by_real_taps():
  """An FSDP matmul as XLA:TPU writes it inside a windowed-einsum loop: 3393 tokens x 2 weight
  shards of 16 input rows -> 256 outputs; the padded window taps read zeros and do not count."""
  text = """HloModule m
ENTRY %e (a: bf16[3393,2,16,1], b: bf16[2,16,4,64]) -> bf16[3393,4,64,1] {
  %a = bf16[3393,2,16,1]{0,2,1,3} parameter(0)
  %b = bf16[2,16,4,64]{3,1,0,2} parameter(1)
  ROOT %c = bf16[3393,4,64,1]{0,2,3,1} convolution(%a, %b), window={size=4x2 pad=3_3x0_0 rhs_reversal=1x0}, dim_labels=b1f0_1i0o->b0f1
}
"""
  assert hlo.analyse(text).flops == 2 * 3393 * 256 * (2 * 16)


def test_hlo_flops_match_xla_and_count_scan_bodies_in_full():
  """On a real compiled program (CPU): XLA's cost analysis counts a scan body once; ours counts
  it per trip, and equals XLA's for the same matmuls unrolled."""
  w = jnp.ones((128, 128), jnp.float32)

  def scanned(x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=6)[0]

  def unrolled(x):
    for _ in range(6):
      x = jnp.tanh(x @ w)
    return x

  x = jnp.ones((32, 128), jnp.float32)
  ours = hlo.analyse(jax.jit(scanned).lower(x).compile().as_text())
  xla = jax.jit(unrolled).lower(x).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert ours.flops == 6 * 2 * 32 * 128 * 128
  assert ours.flops == pytest.approx(xla["flops"], rel=0.05)


def test_bf16_by_default_on_accelerators_only():
  c = pretrain.get_config("111m")
  assert c.model.dtype == "auto"
  assert state_lib.model_config(c, 424, True, "tpu").dtype == "bfloat16"
  assert state_lib.model_config(c, 424, True, "gpu").dtype == "bfloat16"
  assert state_lib.model_config(c, 424, True, "cpu").dtype == "float32"
  assert state_lib.model_config(c, 424, True).dtype == "float32"  # this test runs on CPU
  c.model.dtype = "float32"
  assert state_lib.model_config(c, 424, True, "tpu").dtype == "float32"


@needs_libtpu
def test_abstract_state_on_compile_only_devices():
  """Failed before: the PRNG key made inside use_mesh() was placed on the compile-only devices
  ('Executable' object has no attribute 'local_devices')."""
  devices = tpu.topology_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  c = pretrain.get_config("tiny")
  mesh = sharding.create_mesh(c.mesh, devices)
  mcfg = state_lib.model_config(c, 94, False, "tpu")
  abstract, _ = state_lib.abstract_train_state(mcfg, state_lib.make_optimizer(c.train), mesh)
  leaves = jax.tree_util.tree_leaves(abstract.params)
  assert all(x.dtype == jnp.float32 for x in leaves)  # float32 params under bf16 compute
  assert all(x.sharding.mesh.devices.flat[0].platform == "tpu" for x in leaves)


@needs_libtpu
@pytest.mark.parametrize("name,devices,kind", [("v4-8", 4, "TPU v4"), ("v5p-8", 4, "TPU v5"),
                                               ("v5e-16", 16, "TPU v5 lite")])
def test_compile_only_devices_are_chips(name, devices, kind):
  """One device per chip, as JAX sees a real slice (v4 / v5p: megacore, two TensorCores as one;
  the 'default' chip config gave v4-8 eight half-chip devices)."""
  found = tpu.topology_devices(name)
  assert len(found) == devices and found[0].device_kind == kind


@needs_libtpu
def test_multislice_mesh_puts_data_across_slices():
  devices = tpu.topology_devices("v5e:2x2", num_slices=2)
  c = pretrain.get_config("111m")  # fsdp=-1 within a slice
  mesh = sharding.create_mesh(c.mesh, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()
  state_lib.validate_config(c, 8, num_slices=2)  # batch 256 over 2 x 4


@needs_libtpu
def test_bench_topology_compiles_the_real_step(tmp_path):
  """`brainlm-bench --topology v5e:2x2`: the real train step of a small config compiled for 4
  v5e chips; one row with memory, FLOPs, collectives and the roofline."""
  out = tmp_path / "plan.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "brainlm_jax.cli.bench", "--config", "configs/pretrain.py:tiny",
       "--topology", "v5e:2x2", "--nobatch-search", "--config.model.num_parcels=94",
       "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "WARNING: could not determine TPU" not in proc.stderr  # libtpu kept quiet
  row = json.loads(out.read_text())["rows"][0]
  assert row["chips"] == 4 and row["device_kind"] == "TPU v5 lite" and row["fits"]
  assert row["dtype"] == "bfloat16" and row["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert 0 < row["total_gib"] < row["hbm_gib"]
  assert row["collectives"]["all-reduce"]["bytes"] > 0  # the gradient all-reduce over data
  assert row["compiled_flops_per_chip"] > 0 and row["hbm_bytes_per_chip"] > 0
  assert 0 < row["mfu_bound"] <= 1 and row["bound_by"] in ("compute", "HBM", "collectives")
  assert "memory per chip (compiler's analysis): fits" in proc.stdout
  assert "roofline estimate" in proc.stdout


@pytest.mark.parametrize("preset", ["tiny", "hcp_conn"])
def test_abstract_batch_is_what_the_pipeline_yields(preset):
  """The compile-only path compiles for `steps.abstract_batch`; a real run feeds the tf.data
  pipeline's batches (pretrain.train_and_evaluate): same keys, shapes and dtypes."""
  from brainlm_jax.data import input_pipeline
  from brainlm_jax.training import steps
  c = pretrain.get_config(preset)
  sample = state_lib.sample_window(c)
  mcfg = state_lib.model_config(c, 5, False)
  rng = np.random.default_rng(0)
  recs = [rng.standard_normal((sample + 40, 5)).astype(np.float32) for _ in range(3)]
  ds = input_pipeline.train_dataset(
      recs, scaler=None, batch_size=4, window=sample, seed=0, num_steps=1,
      masking={**c.masking.to_dict(), "patch_len": c.model.patch_len, "window": c.data.window})
  mesh = sharding.create_mesh(c.mesh, jax.devices()[:1])
  abstract = steps.abstract_batch(c, mcfg, 4, mesh)
  spec = {k: (tuple(v.shape), v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()}
  assert {k: (tuple(v.shape), v.dtype) for k, v in abstract.items()} == spec


def test_hlo_bytes_match_xla_on_a_loop_free_program():
  """Without loops our HBM-bytes and FLOP counts are XLA's own (a gradient step, compiled here)."""
  w = jnp.ones((256, 256), jnp.float32)

  def loss(x):
    for _ in range(4):
      x = jax.nn.gelu(x @ w) + x
    return jnp.sum(x ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((512, 256), jnp.float32)).compile()
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  ours = hlo.analyse(compiled.as_text())
  assert ours.hbm_bytes == pytest.approx(xla["bytes accessed"], rel=1e-3)
  assert ours.flops == pytest.approx(xla["flops"], rel=0.05)  # XLA adds elementwise FLOPs
