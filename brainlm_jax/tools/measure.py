"""Measuring a step: time, CPU load, peak memory, and the peak FLOP/s an MFU is taken against.

  measure(run_step, steps=5, warmup=2, batch=B) -> {step_s, samples_per_s, peak_rss_mib, ...}
  peak_flops(device, dtype) -> (flop/s, source)   data-sheet table for GPUs/TPUs; a measured
                                                  float32 matmul on CPU
  maxrss_mib() / rss_mib() / limit_cpus(n) / malloc_trim()   process-level helpers (Linux)
Shared by `brainlm-bench` (tools/bench.py), the PyTorch peer (tools/torch_peer.py) and
benchmarks/*.py.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any, Callable

MIB = 1024.0 * 1024.0

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
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


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


def best_rate(run: Callable[[], Any], flops: float, repeats: int) -> float:
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
  return best_rate(lambda: jax.block_until_ready(f(a)), 2.0 * n ** 3, repeats)


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
