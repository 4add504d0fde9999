"""Will a compiled step fit? XLA's memory analysis against what the device has, before running.

  need = step_bytes(compiled.memory_analysis())          bytes one device needs at peak
  have, where = available_bytes(device)                  free bytes (device limit, or host RAM)
  check_fits(compiled, batch, divisor, what)             raises OutOfMemory with a batch that fits

On GPU/TPU `have` is the allocator's limit (`memory_stats()['bytes_limit']`); on CPU it is the
host's MemAvailable. The fitting batch is an estimate: the state (arguments that are not the
batch) is fixed, everything else scales with the batch, rounded down to the mesh's batch divisor.
"""

from __future__ import annotations

from typing import Any

import jax

GIB = 1024.0 ** 3
HEADROOM = 0.9  # use at most this share of what is available (allocator fragmentation, runtime)


class OutOfMemory(MemoryError):
  """A compiled step needs more memory than the device has; the message names a batch that fits."""

  def __init__(self, message: str, fitting_batch: int):
    super().__init__(message)
    self.fitting_batch = fitting_batch


def step_bytes(mem: Any) -> int | None:
  """Peak bytes per device of an executable from its `memory_analysis()` (None if unknown):
  arguments + outputs - donated aliases + temporaries + generated code."""
  if mem is None:
    return None
  get = lambda name: int(getattr(mem, name, 0) or 0)  # noqa: E731
  return (get("argument_size_in_bytes") + get("output_size_in_bytes") - get("alias_size_in_bytes")
          + get("temp_size_in_bytes") + get("generated_code_size_in_bytes"))


def _host_available() -> int | None:
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def available_bytes(device: jax.Device | None = None) -> tuple[int | None, str]:
  """(bytes a step may use on `device`, where that figure comes from)."""
  device = device or jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
      return free, f"{device.device_kind} memory limit"
  return _host_available(), "host MemAvailable"


def fitting_batch(need: int, batch: int, batch_input_bytes: int, state_bytes: int, have: int,
                  divisor: int = 1) -> int:
  """Largest multiple of `divisor` whose estimated need fits `have` * HEADROOM (0 if none):
  `state_bytes` stays, the rest of `need` scales with the batch."""
  per_sample = max(need - state_bytes, batch_input_bytes, 1) / max(batch, 1)
  fit = int((have * HEADROOM - state_bytes) // per_sample)
  return max(0, fit // divisor * divisor)


def check_fits(compiled: Any, batch: int, *, what: str, state_bytes: int, divisor: int = 1,
               device: jax.Device | None = None, available: int | None = None) -> int | None:
  """Raises OutOfMemory (one line: needed, available, a batch that fits) if `compiled` (run at a
  global `batch`) needs more than the device has. Returns the bytes needed (None if unknown).

  `state_bytes`: the per-device bytes of the arguments that do not scale with the batch (params,
  optimizer state); `available` overrides the device's figure (tests)."""
  mem = compiled.memory_analysis()
  need = step_bytes(mem)
  have, where = (available, "given") if available is not None else available_bytes(device)
  if need is None or have is None or need <= have * HEADROOM:
    return need
  batch_input = max(int(getattr(mem, "argument_size_in_bytes", 0) or 0) - state_bytes, 0)
  fit = fitting_batch(need, batch, batch_input, state_bytes, have, divisor)
  hint = (f"batch {fit} should fit (--config.train.batch_size={fit})" if fit else
          "no batch fits: shard the state over more devices (mesh.fsdp) or use a smaller model")
  raise OutOfMemory(f"{what} needs {fmt_bytes(need)} per device but {fmt_bytes(have)} is "
                    f"available ({where}); {hint}", fit)


def fmt_bytes(n: float) -> str:
  return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def tree_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of arrays / ShapeDtypeStructs (sharded leaves: one shard)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.shape
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
      shape = sharding.shard_shape(shape)
    n = 1
    for d in shape:
      n *= int(d)
    total += n * jax.numpy.dtype(leaf.dtype).itemsize
  return total
