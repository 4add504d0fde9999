"""Train-step benchmarks: speed, memory and MFU of our step, and the PyTorch peer at its shape.

  bench_train_step(config, ...) -> row     our jit-ted `train.make_train_step`, in this process
  peer_row(shape, ...) -> row               HF `ViTMAEForPreTraining` at the same widths/depths,
                                            in a subprocess (its own peak RSS); needs torch
  peak_flops(device, dtype) -> (flop/s, source)   table for GPUs/TPUs, a measured matmul on CPU
  model_flops(...)                          FLOPs of one step from XLA's cost analysis

A row is a dict: compile_s, step_s (median of the timed steps, each ended by
`block_until_ready`), samples_per_s, tokens_per_s, peak memory, flops_per_step, mfu, ...
`brainlm-bench` (cli/bench.py) and `benchmarks/train_step.py` print them.

MFU = flops_per_step / step_s / peak. flops_per_step is XLA's cost analysis of the same step
traced with layers unrolled, no remat and plain attention: XLA counts a loop body (scan over
layers, blockwise attention tiles) once, and model FLOPs exclude rematerialisation (the PaLM
convention), so this is the count of the math the step does, however it is scheduled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

_MIB = 1024.0 * 1024.0

# Dense peak FLOP/s per device (vendor data sheets; no sparsity): (substring of
# `device.device_kind` lower-cased, {compute dtype: peak}). float32 on NVIDIA tensor cores is
# TF32 (XLA's default for float32 matmuls on Ampere and later); TPUs run float32 matmuls as
# bf16 passes, so their one figure is used for both.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100", {"bfloat16": 989e12, "float32": 495e12}),  # SXM; PCIe is 756 / 378
    ("h200", {"bfloat16": 989e12, "float32": 495e12}),
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),  # 'TPU v5' is v5p
    ("tpu v6", {"bfloat16": 918e12, "float32": 918e12}),  # Trillium
)


# ----------------------------------------------------------------------------------------------
# Process-level measurements (Linux; each returns None where unavailable).


def rss_mib() -> float:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB


def maxrss_mib() -> float:
  """Peak RSS of this process so far (MiB): VmHWM where /proc has it, else ru_maxrss.

  Not ru_maxrss on Linux: it survives exec, so a worker started by a big parent reports at least
  the parent's RSS at the fork; and writing to /proc/self/clear_refs (`_reset_hwm`) lowers it.
  """
  hwm = _hwm_mib()
  return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hwm_mib() -> float | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def _reset_hwm() -> bool:
  """Resets VmHWM (the peak RSS the kernel reports in /proc/self/status) to the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def malloc_trim() -> None:
  """Returns freed heap to the OS (glibc), so RSS tracks live memory rather than the allocator's
  high-water mark."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def limit_cpus(n: int) -> list[int]:
  """Pins this process (and the threads it will start) to `n` of its allowed CPUs; sets the
  OpenMP/MKL thread counts. (Pinning is the only thread limit XLA:CPU obeys in jax 0.10.)"""
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(n)
  try:
    allowed = sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return []
  if n < len(allowed):
    os.sched_setaffinity(0, allowed[:n])
  return sorted(os.sched_getaffinity(0))


def _busy_cpu_s() -> float | None:
  """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def measure(run_step: Callable[[], Any], *, steps: int, warmup: int, batch: int,
            log: Callable[[str], None] = lambda _: None) -> dict:
  """Times `warmup` untimed calls (the first also alone) then `steps` timed ones.

  `run_step` must block until its step is done. Returns first_step_s, step_s (median),
  step_times_s, samples_per_s, cpu_util (own CPU / wall), other_load (cores' worth of CPU that
  other processes used meanwhile: ~0 on an idle machine), steady_peak_rss_mib, peak_rss_mib.
  """
  if steps < 1 or warmup < 1:
    raise ValueError(f"steps ({steps}) and warmup ({warmup}) must be >= 1")
  t = time.perf_counter()
  run_step()
  first = time.perf_counter() - t
  log(f"first step {first:.2f} s")
  for _ in range(warmup - 1):
    run_step()
  malloc_trim()
  peak_before = maxrss_mib()  # imports, set-up, compile, first steps: lost by the reset below
  hwm_ok = _reset_hwm()
  times, others = [], []
  cpu0, wall0, busy0 = time.process_time(), time.perf_counter(), _busy_cpu_s()
  for i in range(steps):
    t, own, busy = time.perf_counter(), _own_cpu_s(), _busy_cpu_s()
    run_step()
    times.append(time.perf_counter() - t)
    other = (None if busy is None else
             max(0.0, (_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / times[-1])
    others.append(other)
    log(f"step {i + 1}/{steps}: {times[-1]:.3f} s"
        + ("" if other is None else f" (other processes: {other:.2f} cores)"))
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  busy = _busy_cpu_s()
  med = statistics.median(times)
  return {
      "first_step_s": first, "step_s": med, "step_times_s": times,
      "samples_per_s": batch / med, "cpu_util": cpu / wall,
      "other_load": (None if busy0 is None or busy is None else
                     max(0.0, (busy - busy0) - cpu) / wall),
      "other_load_per_step": others,
      "steady_peak_rss_mib": _hwm_mib() if hwm_ok else None,
      "peak_rss_mib": max(peak_before, maxrss_mib()),
  }


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s.


def _best_rate(run: Callable[[], Any], flops: float, repeats: int) -> float:
  """flops / the best wall time of `repeats` calls of `run` (after one untimed call)."""
  run()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t)
  return flops / best


def cpu_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul FLOP/s of this process's CPUs (best of `repeats` n x n products)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x).lower(a).compile()
  return _best_rate(lambda: jax.block_until_ready(f(a)), 2.0 * n ** 3, repeats)


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """The same for torch: float32 n x n matmul FLOP/s on this process's CPUs."""
  import torch  # pylint: disable=import-outside-toplevel
  a = torch.randn(n, n)
  return _best_rate(lambda: a @ a, 2.0 * n ** 3, repeats)


def peak_flops(device, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s of one device at `dtype`, where the figure comes from)."""
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return cpu_matmul_peak(), "measured float32 2048^2 matmul on this CPU"
  for key, table in PEAK_FLOPS:
    if key in kind:
      dt = "bfloat16" if dtype in ("bfloat16", "float16") else "float32"
      return table[dt], f"{device.device_kind} {dt} data-sheet peak"
  return None, f"no peak known for {device.device_kind!r}"


# ----------------------------------------------------------------------------------------------
# Our train step.


def _model_flops(config, mcfg, tx, mesh, batch, coords) -> float | None:
  """FLOPs of one train step: XLA's cost analysis of the step lowered with layers unrolled, no
  remat and 'xla' attention (the same math; XLA would count a loop body once)."""
  import jax  # pylint: disable=import-outside-toplevel
  from brainlm_jax import train  # pylint: disable=import-outside-toplevel
  from brainlm_jax.model import BrainLM  # pylint: disable=import-outside-toplevel
  plain = dataclasses.replace(mcfg, scan_layers=False, remat="none", attention="xla")
  abstract, shardings = abstract_train_state(plain, tx, mesh)
  with jax.set_mesh(mesh):
    step = train.make_train_step(BrainLM(plain), tx, config, mesh, shardings)
    try:
      cost = step.lower(abstract, batch, coords).cost_analysis()
    except Exception:  # pylint: disable=broad-except  # some backends cannot analyse lowered HLO
      return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0))
  return flops if flops > 0 else None


def abstract_train_state(mcfg, tx, mesh):
  """(abstract TrainState whose leaves carry their shardings, the shardings), as
  `train.create_train_state` makes them, without allocating anything."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from brainlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax import sharding, train  # pylint: disable=import-outside-toplevel
  from brainlm_jax.model import BrainLM  # pylint: disable=import-outside-toplevel
  model = BrainLM(mcfg)

  def init(rng):
    params = model.init(rng, *train._dummy_inputs(mcfg))["params"]  # pylint: disable=protected-access
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=rng)

  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.logical_to_shardings(boxed, mesh)
  return ckpt_lib.abstract_with_shardings(nn.unbox(boxed), shardings), shardings


def example_batch(config, batch_size: int, num_parcels: int | None = None):
  """(signal [B, P, W] float32, coords [P, 3] | None, source): windows of the real recordings in
  config.data.path (scaled as in training) when set, else N(0, 1) with config.data.coords (or
  `num_parcels`, default 424, random coordinates)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  d = config.data
  if d.path:
    from brainlm_jax import train  # pylint: disable=import-outside-toplevel
    from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    data = train.prepare_data(config)
    ds = input_pipeline.train_dataset(data.train, scaler=data.scaler, batch_size=batch_size,
                                      window=d.window, seed=config.seed, num_steps=1)
    signal = next(iter(ds.as_numpy_iterator()))["signal"]
    return signal, data.coords, f"{len(data.train)} training recordings in {d.path}"
  rng = np.random.default_rng(0)
  if d.coords:
    from brainlm_jax import recordings  # pylint: disable=import-outside-toplevel
    coords, src = recordings.load_coordinates(d.coords), f"N(0,1) signal; coords {d.coords}"
  else:
    p = num_parcels or d.num_parcels or 424
    coords, src = rng.uniform(-70, 70, (p, 3)).astype(np.float32), "N(0,1) signal, random coords"
  signal = rng.standard_normal((batch_size, len(coords), d.window), dtype=np.float32)
  return signal, coords, src


def bench_train_step(config, *, steps: int = 5, warmup: int = 2, num_parcels: int | None = None,
                     peak: tuple[float | None, str] | None = None,
                     log: Callable[[str], None] = lambda _: None) -> dict:
  """Compiles and times one full train step (fwd + bwd + clip + AdamW) of `config` on its mesh.

  The batch is config.train.batch_size (global). Returns a row (see the module docstring).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from brainlm_jax import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax import masking as masking_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax import sharding, train  # pylint: disable=import-outside-toplevel
  from brainlm_jax.model import BrainLM, count_params  # pylint: disable=import-outside-toplevel

  import_rss = rss_mib()
  b = int(config.train.batch_size)
  signal, coords_np, source = example_batch(config, b, num_parcels)
  train.validate_config(config, jax.device_count())
  mcfg = train.model_config(config, signal.shape[1], coords_np is not None)
  mesh = sharding.create_mesh(config.mesh)
  tx = train.make_optimizer(config.train)
  state, shardings = train.create_train_state(mcfg, tx, mesh, seed=config.seed)
  n_tokens = mcfg.num_parcels * mcfg.num_patches
  visible = masking_lib.num_visible(config.masking.mode, mcfg.num_parcels, mcfg.num_patches,
                                    config.masking.ratio, config.masking.forecast_patches)

  def impl(length, heads, width):
    x = jax.ShapeDtypeStruct((b, length, heads, width // heads), jax.numpy.dtype(mcfg.dtype))
    return attention_lib.resolve_implementation(x, x, mcfg.attention)

  with jax.set_mesh(mesh):
    batch = train.to_global({"signal": signal}, mesh)
    coords = (None if coords_np is None else
              jax.device_put(np.asarray(coords_np, np.float32), sharding.replicated(mesh)))
    jax.block_until_ready((state, batch))
    malloc_trim()
    setup_rss = rss_mib()
    params = count_params(state.params)
    log(f"{params:,} params, batch {b} x {mcfg.num_parcels} parcels x {mcfg.window} timepoints "
        f"({source}); mesh {dict(mesh.shape)}; compiling")
    step = train.make_train_step(BrainLM(mcfg), tx, config, mesh, shardings)
    t = time.perf_counter()
    compiled = step.lower(state, batch, coords).compile()
    compile_s = time.perf_counter() - t
    log(f"compiled in {compile_s:.1f} s")
  flops = _model_flops(config, mcfg, tx, mesh, batch, coords)
  mem = compiled.memory_analysis()
  holder = {"state": state}
  del state

  def run_step():
    holder["state"], metrics = compiled(holder["state"], batch, coords)
    jax.block_until_ready(metrics)
    holder["metrics"] = metrics

  out = measure(run_step, steps=steps, warmup=warmup, batch=b, log=log)
  device = jax.devices()[0]
  peak = peak or peak_flops(device, mcfg.dtype)
  n_dev = mesh.devices.size
  device_peak = None
  if device.platform != "cpu":
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    device_peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / _MIB or None
  step_s = out["step_s"]
  out.update({
      "framework": "jax", "name": f"brainlm_jax {config.get('preset', '?')} "
                                  f"({config.masking.mode})",
      "versions": {"jax": jax.__version__}, "device": device.device_kind,
      "platform": device.platform, "num_devices": n_dev, "mesh": dict(mesh.shape),
      "dtype": mcfg.dtype, "batch": b, "data": source,
      "tokens": n_tokens, "visible_tokens": visible, "encoder_seq": 1 + visible,
      "decoder_seq": 1 + n_tokens, "params": params,
      "attention": {"requested": mcfg.attention,
                    "encoder": impl(1 + visible, mcfg.num_heads, mcfg.hidden_size),
                    "decoder": impl(1 + n_tokens, mcfg.decoder_num_heads,
                                    mcfg.decoder_hidden_size)},
      "scan_layers": mcfg.scan_layers, "remat": mcfg.remat, "model": dataclasses.asdict(mcfg),
      "compile_s": compile_s, "import_rss_mib": import_rss, "setup_rss_mib": setup_rss,
      "xla_temp_mib": None if mem is None else mem.temp_size_in_bytes / _MIB,
      "xla_argument_mib": None if mem is None else mem.argument_size_in_bytes / _MIB,
      "device_peak_mib": device_peak,
      "tokens_per_s": b * n_tokens / step_s,
      "flops_per_step": flops, "peak_flops_per_device": peak[0], "peak_source": peak[1],
      "mfu": (flops / step_s / (peak[0] * n_dev)) if flops and peak[0] else None,
      "tensorflow_loaded": "tensorflow" in sys.modules,
      "final_loss": float(holder["metrics"]["train_loss"]),
  })
  return out


# ----------------------------------------------------------------------------------------------
# The PyTorch peer: Hugging Face ViTMAEForPreTraining at our widths and depths.


def peer_shape(model: dict, batch: int, mask_ratio: float, dtype: str = "float32") -> dict:
  """The peer's settings for our model (a row's `model`: ModelConfig fields): same widths and
  depths; a square grid of 16 x 16 one-channel patches with about our token count (HF's 2-D
  sin-cos position table needs a square grid)."""
  m = model
  side = max(1, round((m["num_parcels"] * (m["window"] // m["patch_len"])) ** 0.5))
  keys = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "decoder_hidden_size",
          "decoder_num_layers", "decoder_num_heads", "decoder_mlp_dim")
  return {**{k: m[k] for k in keys}, "image_size": 16 * side, "patch_size": 16, "batch": batch,
          "mask_ratio": mask_ratio, "dtype": dtype}


def _peer_model(s: dict):
  """transformers.ViTMAEForPreTraining at the peer shape `s` (see `peer_shape`), SDPA attention."""
  from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=import-outside-toplevel
  cfg = ViTMAEConfig(
      hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
      num_attention_heads=s["num_heads"], intermediate_size=s["mlp_dim"],
      decoder_hidden_size=s["decoder_hidden_size"],
      decoder_num_hidden_layers=s["decoder_num_layers"],
      decoder_num_attention_heads=s["decoder_num_heads"],
      decoder_intermediate_size=s["decoder_mlp_dim"], image_size=s["image_size"],
      patch_size=s["patch_size"], num_channels=1, mask_ratio=s["mask_ratio"],
      attn_implementation="sdpa")
  return ViTMAEForPreTraining(cfg)


def peer_worker(shape: dict, *, steps: int, warmup: int,
                log: Callable[[str], None] = lambda _: None) -> dict:
  """Builds and times the peer in this process (torch + transformers). Returns a row."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_interop_threads(1)
  import transformers  # pylint: disable=import-outside-toplevel
  from torch.nn.attention import SDPBackend  # pylint: disable=import-outside-toplevel

  import_rss = rss_mib()
  torch.manual_seed(0)
  s = shape
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = _peer_model(s).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
  pixels = torch.randn(s["batch"], 1, s["image_size"], s["image_size"], device=device)
  n_tokens = (s["image_size"] // s["patch_size"]) ** 2
  malloc_trim()
  setup_rss = rss_mib()
  log(f"peer setup: {sum(p.numel() for p in model.parameters()):,} params, {n_tokens} tokens")
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=s["dtype"] == "bfloat16")
  box = {}

  def run_step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      out = model(pixel_values=pixels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    box["loss"] = float(out.loss.detach())  # syncs

  # Which SDPA kernels the model calls (first step only).
  backends = {int(v): k for k, v in SDPBackend.__members__.items()}
  calls, original = [], torch.nn.functional.scaled_dot_product_attention

  def counting_sdpa(q, k, v, *a, **kw):
    try:
      choice = backends.get(int(torch._fused_sdp_choice(q, k, v, *a, **kw)), "?")  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      choice = "?"
    calls.append((tuple(q.shape), str(q.dtype).replace("torch.", ""), choice))
    return original(q, k, v, *a, **kw)

  first = {"done": False}

  def run_step_traced():
    if first["done"]:
      return run_step()
    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    try:
      run_step()
    finally:
      torch.nn.functional.scaled_dot_product_attention = original
      first["done"] = True

  out = measure(run_step_traced, steps=steps, warmup=warmup, batch=s["batch"], log=log)
  matmul_peak = torch_matmul_peak() if device == "cpu" else None  # after the timed steps
  visible = int(n_tokens * (1 - s["mask_ratio"]))
  out.update({
      "framework": "torch", "name": "HF ViTMAEForPreTraining (sdpa)",
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
      "device": device, "batch": s["batch"], "dtype": s["dtype"],
      "tokens": n_tokens, "visible_tokens": visible, "encoder_seq": 1 + visible,
      "decoder_seq": 1 + n_tokens,
      "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
      "params_total": sum(p.numel() for p in model.parameters()),
      "attention": {"requested": "sdpa", "config": model.config._attn_implementation,  # pylint: disable=protected-access
                    "sdpa_calls_per_forward": len(calls),
                    "sdpa_kernels": sorted({f"{c[0]}:{c[1]}:{c[2]}" for c in calls})},
      "compile_s": None, "import_rss_mib": import_rss, "setup_rss_mib": setup_rss,
      "tokens_per_s": s["batch"] * n_tokens / out["step_s"],
      "device_peak_mib": (torch.cuda.max_memory_allocated() / _MIB if device == "cuda"
                          else None),
      "final_loss": box["loss"], "matmul_peak_flops": matmul_peak,
  })
  return out


def peer_flops(shape: dict) -> float:
  """FLOPs of one peer train step (forward + backward) at `shape`, by torch's FlopCounterMode.

  Traced on the meta device (shapes only: no memory, no time) with SDPA's math backend, whose
  matmuls the counter sees (the fused CPU flash kernel has no FLOP formula); so attention's
  backward is counted without a flash kernel's recomputation, as XLA's cost analysis of ours is.
  The optimizer's elementwise work is not counted (~10 FLOPs per parameter: < 0.01% here).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  with torch.device("meta"):
    model = _peer_model(shape)
    pixels = torch.empty(shape["batch"], 1, shape["image_size"], shape["image_size"])
  counter = FlopCounterMode(display=False)
  with sdpa_kernel(SDPBackend.MATH), counter:
    model(pixel_values=pixels).loss.backward()
  return float(counter.get_total_flops())


def peer_row(shape: dict, *, steps: int, warmup: int, threads: int | None = None) -> dict:
  """Runs `peer_worker` in a fresh Python (its own peak RSS; pinned to `threads` CPUs)."""
  spec = json.dumps({"shape": shape, "steps": steps, "warmup": warmup, "threads": threads})
  proc = subprocess.run([sys.executable, "-m", "brainlm_jax.bench", "peer", spec],
                        stdout=subprocess.PIPE, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    why = " (killed by SIGKILL: most likely out of memory)" if proc.returncode == -9 else ""
    raise RuntimeError(f"peer worker failed (exit {proc.returncode}){why}: {proc.stdout[-2000:]}")
  return json.loads(lines[-1])


def finish_row(row: dict, t0: float, threads: int | None, cpus: list[int]) -> dict:
  row.update({"cpus": cpus, "threads": threads, "loadavg_at_start": os.getloadavg()[0],
              "peak_after_setup_mib": row["peak_rss_mib"] - row["setup_rss_mib"],
              "wall_s": time.perf_counter() - t0})
  return row


def ratios(ours: dict, peer: dict) -> dict:
  """ours / peer: samples/s, tokens/s (corrects for the token counts), peak RSS."""
  steady = (ours["steady_peak_rss_mib"] / peer["steady_peak_rss_mib"]
            if ours.get("steady_peak_rss_mib") and peer.get("steady_peak_rss_mib") else None)
  return {"samples_per_s": ours["samples_per_s"] / peer["samples_per_s"],
          "tokens_per_s": ours["tokens_per_s"] / peer["tokens_per_s"],
          "peak_rss": ours["peak_rss_mib"] / peer["peak_rss_mib"],
          "peak_after_setup": ours["peak_after_setup_mib"] / peer["peak_after_setup_mib"],
          "steady_peak_rss": steady}


def _main(argv: list[str]) -> None:
  """`python -m brainlm_jax.bench peer JSON`: the peer worker; prints its row as one JSON line."""
  if len(argv) != 3 or argv[1] != "peer":
    raise SystemExit("usage: python -m brainlm_jax.bench peer '{\"shape\": ..., \"steps\": N, "
                     "\"warmup\": N, \"threads\": N}'")
  spec = json.loads(argv[2])
  t0 = time.perf_counter()
  threads = spec.get("threads")
  cpus = limit_cpus(threads) if threads else []
  if threads:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)

  def log(msg):
    print(f"[torch {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

  row = peer_worker(spec["shape"], steps=spec["steps"], warmup=spec["warmup"], log=log)
  print(json.dumps(finish_row(row, t0, threads, cpus)), flush=True)


if __name__ == "__main__":
  _main(sys.argv)
