"""Train-step benchmark of a preset: speed, memory and MFU of our jit-ted step.

  row = bench_train_step(config, steps=5, warmup=2)   compile + time `steps.make_train_step`
  row["batch"], row["batch_note"]                      the batch run: the largest that fits memory
                                                       when the requested one would not

A row is a dict: compile_s, step_s (median of the timed steps, each ended by
`block_until_ready`), samples_per_s, tokens_per_s, peak memory, flops_per_step, mfu, ...
`brainlm-bench` (cli/bench.py), benchmarks/train_step.py and benchmarks/device_check.py print
them; the PyTorch peer's rows come from tools/torch_peer.py.

MFU = flops_per_step / step_s / peak. flops_per_step is XLA's cost analysis of the same step
traced with layers unrolled, no remat and plain attention: XLA counts a loop body (scan over
layers, blockwise attention tiles) once, and model FLOPs exclude rematerialisation (the PaLM
convention), so this is the count of the math the step does, however it is scheduled. Where
XLA gives no count (JAX 0.11 on GPU), `analytic_flops` counts the matmuls by hand instead
(`flops_source` says which). Nothing
here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

from brainlm_jax.tools.measure import MIB, malloc_trim, measure, peak_flops, rss_mib


def _model_flops(config, mcfg, tx, mesh, batch, coords) -> float | None:
  """FLOPs of one train step: XLA's cost analysis of the step lowered with layers unrolled, no
  remat and 'xla' attention (the same math; XLA would count a loop body once)."""
  from brainlm_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import sharding, state as state_lib, steps  # pylint: disable=import-outside-toplevel
  plain = dataclasses.replace(mcfg, scan_layers=False, remat="none", attention="xla")
  abstract, shardings = state_lib.abstract_train_state(plain, tx, mesh)
  with sharding.use_mesh(mesh):
    step = steps.make_train_step(build_model(plain), tx, config, mesh, shardings)
    try:
      cost = step.lower(abstract, batch, coords).cost_analysis()
    except Exception:  # pylint: disable=broad-except  # some backends cannot analyse lowered HLO
      return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0))
  return flops if flops > 0 else None


def analytic_flops(mcfg, batch: int, visible: int) -> float:
  """Matmul FLOPs of one train step (forward + backward = 3 x forward), counted by hand the way
  MaxText does: the projections and MLPs of every encoder and decoder layer, the two attention
  products (QK^T and PV), the patch embedding, the encoder-to-decoder projection and the
  reconstruction head. Elementwise work (norms, softmax, the optimizer) is left out. The
  fallback where XLA's cost analysis is unavailable (JAX 0.11 on GPU returned none)."""
  d, m, le = mcfg.hidden_size, mcfg.mlp_dim, mcfg.num_layers
  dd, md, ld = mcfg.decoder_hidden_size, mcfg.decoder_mlp_dim, mcfg.decoder_num_layers
  se, sd = 1 + visible, 1 + mcfg.num_parcels * mcfg.num_patches
  layer = lambda s, w, mlp: s * (8 * w * w + 4 * w * mlp) + 4 * s * s * w  # noqa: E731
  forward = (le * layer(se, d, m) + ld * layer(sd, dd, md)
             + 2 * visible * mcfg.patch_len * d + 2 * se * d * dd + 2 * sd * dd * mcfg.patch_len)
  return float(3 * batch * forward)


def example_batch(config, batch_size: int, num_parcels: int | None = None):
  """(signal [B, P, W] float32, coords [P, 3] | None, source): the first `batch_size` windows of
  the real recordings in config.data.path (scaled as in training; cycled if there are fewer)
  when set, else N(0, 1) with config.data.coords (or `num_parcels`, default 424, random
  coordinates). Nothing here imports TensorFlow for raw recordings."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  d = config.data
  if d.path:
    from brainlm_jax.data import run_data, windows  # pylint: disable=import-outside-toplevel
    data = run_data.prepare_data(config)
    batch = next(windows.iter_windows(data.train, data.scaler, window=d.window,
                                      batch_size=batch_size, max_windows=batch_size))
    signal = np.resize(batch.signal[:batch.n], (batch_size,) + batch.signal.shape[1:])
    return signal, data.coords, f"{len(data.train)} training recordings in {d.path}"
  rng = np.random.default_rng(0)
  if d.coords:
    from brainlm_jax.data import readers  # pylint: disable=import-outside-toplevel
    coords, src = readers.load_coordinates(d.coords), f"N(0,1) signal; coords {d.coords}"
  else:
    p = num_parcels or d.num_parcels or 424
    coords, src = rng.uniform(-70, 70, (p, 3)).astype(np.float32), "N(0,1) signal, random coords"
  signal = rng.standard_normal((batch_size, len(coords), d.window), dtype=np.float32)
  return signal, coords, src


def bench_train_step(config, *, steps: int = 5, warmup: int = 2, num_parcels: int | None = None,
                     peak: tuple[float | None, str] | None = None,
                     log: Callable[[str], None] = lambda _: None,
                     available: int | None = None, profile_dir: str | None = None) -> dict:
  """Compiles and times one full train step (fwd + bwd + clip + AdamW) of `config` on its mesh.

  The batch is config.train.batch_size (global), unless the compiled step would not fit the
  device's memory (XLA's memory analysis, read before anything runs): then the largest batch
  that fits is benchmarked instead and the row says so ('batch_requested', 'batch_note').
  `available` overrides the device's free bytes (tests); `profile_dir`: after timing, three more
  steps run under `jax.profiler.trace(profile_dir)`. Returns a row (see the module docstring).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models import build_model, masking as masking_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models.brainlm import count_params  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import sharding, state as state_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import steps as steps_lib  # pylint: disable=import-outside-toplevel

  from brainlm_jax.training import memory as memory_lib  # pylint: disable=import-outside-toplevel

  import_rss = rss_mib()
  b = requested = int(config.train.batch_size)
  signal, coords_np, source = example_batch(config, b, num_parcels)
  state_lib.validate_config(config, jax.device_count())
  mcfg = state_lib.model_config(config, signal.shape[1], coords_np is not None)
  mesh = sharding.create_mesh(config.mesh)
  tx = state_lib.make_optimizer(config.train)
  n_tokens = mcfg.num_parcels * mcfg.num_patches
  visible = masking_lib.num_visible(config.masking.mode, mcfg.num_parcels, mcfg.num_patches,
                                    config.masking.ratio, config.masking.forecast_patches)
  abstract, shardings = state_lib.abstract_train_state(mcfg, tx, mesh)
  state_bytes = memory_lib.tree_bytes(abstract)
  coords = (None if coords_np is None else
            jax.device_put(np.asarray(coords_np, np.float32), sharding.replicated(mesh)))
  step = steps_lib.make_train_step(build_model(mcfg), tx, config, mesh, shardings)

  def impl(length, heads, width):  # inside the mesh: 'auto' decides by the mesh's platform
    x = jax.ShapeDtypeStruct((b, length, heads, width // heads), jax.numpy.dtype(mcfg.dtype))
    with sharding.use_mesh(mesh):
      return attention_lib.resolve_implementation(x, x, mcfg.attention)

  def compile_at(batch_size):
    with sharding.use_mesh(mesh):
      x = jax.ShapeDtypeStruct((batch_size,) + signal.shape[1:], np.float32,
                               sharding=sharding.batch_sharding(mesh, 3))
      t = time.perf_counter()
      exe = step.lower(abstract, {"signal": x}, coords).compile()
    return exe, time.perf_counter() - t

  log(f"batch {b} x {mcfg.num_parcels} parcels x {mcfg.window} timepoints ({source}); "
      f"mesh {dict(mesh.shape)}; compiling")
  compiled, compile_s = compile_at(b)
  batch_note = None
  for attempt in range(4):  # the fitting batch is a linear estimate: re-check what it compiles to
    try:
      memory_lib.check_fits(compiled, b, what=f"the train step at batch {b}",
                            state_bytes=state_bytes, divisor=sharding.batch_divisor(mesh),
                            available=available)
      break
    except memory_lib.OutOfMemory as e:
      if not e.fitting_batch or attempt == 3:
        raise
      b = min(e.fitting_batch, b - sharding.batch_divisor(mesh))
      batch_note = f"{e}; benchmarking batch {b} instead of {requested}"
      log(batch_note)
      signal, coords_np, source = example_batch(config, b, num_parcels)
      compiled, compile_s = compile_at(b)
  log(f"compiled in {compile_s:.1f} s")
  mem = compiled.memory_analysis()
  with sharding.use_mesh(mesh):
    batch = steps_lib.to_global({"signal": signal}, mesh)
  state, _ = state_lib.create_train_state(mcfg, tx, mesh, seed=config.seed)
  jax.block_until_ready((state, batch))
  malloc_trim()
  setup_rss = rss_mib()
  params = count_params(state.params)
  flops, flops_source = _model_flops(config, mcfg, tx, mesh, batch, coords), "XLA cost analysis"
  if flops is None:
    flops, flops_source = analytic_flops(mcfg, b, visible), "counted matmuls (analytic_flops)"
  holder = {"state": state}
  del state

  def run_step():
    holder["state"], metrics = compiled(holder["state"], batch, coords)
    jax.block_until_ready(metrics)
    holder["metrics"] = metrics

  out = measure(run_step, steps=steps, warmup=warmup, batch=b, log=log)
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(3):
        run_step()
  device = jax.devices()[0]
  peak = peak or peak_flops(device, mcfg.dtype)
  n_dev = mesh.devices.size
  device_peak = None
  if device.platform != "cpu":
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    device_peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / MIB or None
  step_s = out["step_s"]
  out.update({
      "framework": "jax", "name": f"brainlm_jax {config.get('preset', '?')} "
                                  f"({config.masking.mode})",
      "versions": {"jax": jax.__version__}, "device": device.device_kind,
      "platform": device.platform, "num_devices": n_dev, "mesh": dict(mesh.shape),
      "dtype": mcfg.dtype, "batch": b, "batch_requested": requested, "batch_note": batch_note,
      "data": source, "step_memory_mib": (memory_lib.step_bytes(mem) or 0) / MIB or None,
      "tokens": n_tokens, "visible_tokens": visible, "encoder_seq": 1 + visible,
      "decoder_seq": 1 + n_tokens, "params": params,
      "attention": {"requested": mcfg.attention,
                    "encoder": impl(1 + visible, mcfg.num_heads, mcfg.hidden_size),
                    "decoder": impl(1 + n_tokens, mcfg.decoder_num_heads,
                                    mcfg.decoder_hidden_size)},
      "scan_layers": mcfg.scan_layers, "remat": mcfg.remat, "model": dataclasses.asdict(mcfg),
      "compile_s": compile_s, "import_rss_mib": import_rss, "setup_rss_mib": setup_rss,
      "xla_temp_mib": None if mem is None else mem.temp_size_in_bytes / MIB,
      "xla_argument_mib": None if mem is None else mem.argument_size_in_bytes / MIB,
      "device_peak_mib": device_peak,
      "tokens_per_s": b * n_tokens / step_s,
      "flops_per_step": flops, "flops_source": flops_source, "peak_flops_per_device": peak[0], "peak_source": peak[1],
      "mfu": (flops / step_s / (peak[0] * n_dev)) if flops and peak[0] else None,
      "tensorflow_loaded": "tensorflow" in sys.modules,
      "final_loss": float(holder["metrics"]["train_loss"]),
  })
  return out
