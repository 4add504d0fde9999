"""Cloud TPU chips and slices by name, and compile-only devices for them on any machine.

  chip = CHIPS["v5e"]                          peak bf16 FLOP/s, HBM bytes and bandwidth, ICI, DCN
  slice_ = parse_topology("v5e-16")            Slice(chip, dims=(4, 4), ...); also "v5p-64",
                                               "v4-8", "v6e-256" or a physical name "v5e:2x2"
  devices = topology_devices("v5e-256", num_slices=2)    512 compile-only devices (needs libtpu)

Names follow Cloud TPU / MaxText: the number after the dash counts chips on v5e and v6e, and
TensorCores on v4 and v5p (two per chip, driven as one "megacore" device), so `v5p-64` is 32 chips
(2x4x4) and `v4-8` is 4 (2x2x1). Compile-only devices come from libtpu's compiler through
`jax.experimental.topologies` (the `.[tpu]` extra); they compile programs and analyse them but
hold no arrays. Run the default backend as CPU beside them (`JAX_PLATFORMS=cpu`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GB = 1e9


class TpuCompilerError(RuntimeError):
  """libtpu is missing or cannot describe the topology (the message says what to do)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's data-sheet figures (per chip; bandwidths in bytes/s, one direction)."""
  name: str
  device_kind: str  # what `device.device_kind` says
  peak_bf16: float  # dense bf16 FLOP/s (float32 matmuls run as bf16 passes: the same figure)
  hbm_bytes: float  # HBM capacity (the compiler reports a little less as usable)
  hbm_bw: float  # HBM bandwidth
  ici_link_bw: float  # one ICI link, one direction
  ici_links: int  # links per chip (2 per torus dimension)
  dcn_bw: float  # data-centre network per chip, one direction (host NICs / chips per host)
  megacore: bool  # the name counts TensorCores (two per chip) rather than chips

  @property
  def ridge(self) -> float:
    """FLOP per HBM byte above which a step is compute-bound."""
    return self.peak_bf16 / self.hbm_bw


# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e:
# peak bf16 per chip, HBM capacity and bandwidth, ICI ports, host NICs / DCN per chip) and, for
# the one-way bandwidth of one ICI link, "How to Scale Your Model" (jax-ml scaling book, TPU
# chapter). v4's DCN per chip is not published; taken as v5p's 50 Gbps.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * 2**30, 1200 * GB, 45 * GB, 6, 6.25 * GB, True),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * 2**30, 819 * GB, 45 * GB, 4, 3.125 * GB, False),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * 2**30, 2765 * GB, 90 * GB, 6, 6.25 * GB, True),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * 2**30, 1640 * GB, 90 * GB, 4, 12.5 * GB, False),
}
_ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6": "v6e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its chip and physical shape (chips along each torus dimension)."""
  name: str  # as the user wrote it
  chip: Chip
  dims: tuple[int, ...]  # (x, y) for v5e / v6e, (x, y, z) for v4 / v5p

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def topology_name(self) -> str:
    """libtpu's name: 'v5e:4x4', 'v5p:2x4x4' (v5p is 'v5' to libtpu)."""
    prefix = {"v5p": "v5"}.get(self.chip.name, self.chip.name)
    return f"{prefix}:{'x'.join(map(str, self.dims))}"

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Wrap-around links per dimension: a full-length dimension of a 2-D pod (16) or every
    dimension of a 3-D slice made of whole 4x4x4 cubes."""
    dims = tuple(self.dims) + (1,) * (3 - len(self.dims))
    if len(self.dims) == 2:
      return tuple(d == 16 for d in dims[:2]) + (False,)  # type: ignore[return-value]
    cube = all(d % 4 == 0 for d in dims)
    return (cube, cube, cube)

  @property
  def chips_per_host(self) -> tuple[int, int, int]:
    if len(self.dims) == 2 and self.chips == 8:  # v5e-8 / v6e-8: one host of 2x4
      return (2, 4, 1)
    return tuple(min(d, b) for d, b in zip(tuple(self.dims) + (1,) * (3 - len(self.dims)),
                                             (2, 2, 1)))  # type: ignore[return-value]


def _chip(name: str) -> Chip:
  name = _ALIASES.get(name.lower(), name.lower())
  if name not in CHIPS:
    raise ValueError(f"unknown TPU generation {name!r}; known: {sorted(CHIPS)}")
  return CHIPS[name]


def _default_dims(chips: int, ndim: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU gives `chips` chips: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, ... 16x16;
  3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ... (doubling the smallest
  dimension, the last first)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: give the physical shape instead (e.g. 'v5p:4x4x12')")
  if ndim == 2:
    x = 2 ** (int(math.log2(chips)) // 2)
    return (x, chips // x)
  if chips < 4:
    return (chips, 1, 1)
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    dims[max(j for j, d in enumerate(dims) if d == smallest)] *= 2
  return tuple(dims)


def parse_topology(name: str) -> Slice:
  """'v5e-16' | 'v5p-64' | 'v4-8' | 'v6e-256' (Cloud TPU accelerator types) or a physical
  shape 'v5e:4x4' / 'v5p:2x4x4' -> Slice. Raises ValueError naming the accepted forms."""
  text = name.strip().lower().replace("v5litepod", "v5e")
  m = re.fullmatch(r"(v\d+[a-z]*)[:](\d+(?:x\d+)+)", text)
  if m:
    chip = _chip(m.group(1))
    dims = tuple(int(d) for d in m.group(2).split("x"))
    return Slice(name, chip, dims)
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
  if not m:
    raise ValueError(f"TPU topology {name!r}: expected an accelerator type such as v5e-16, "
                     "v5p-64, v4-8, v6e-256, or a physical shape such as v5e:4x4 or v5p:2x4x4")
  chip = _chip(m.group(1))
  count = int(m.group(2))
  chips = count // 2 if chip.megacore else count
  if chips < 1 or (chip.megacore and count % 2):
    raise ValueError(f"{name}: {chip.name}-N counts TensorCores (2 per chip), so N is even")
  return Slice(name, chip, _default_dims(chips, 3 if chip.megacore else 2))


def has_tpu_chips() -> bool:
  """Whether this machine has TPU chips attached (the device files a TPU VM has)."""
  import glob  # pylint: disable=import-outside-toplevel
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_env() -> None:
  """On a machine without TPU chips, tells libtpu (installed by the `.[tpu]` extra, loaded by JAX
  at start-up and for compile-only devices) that this is no TPU VM, so it does not print
  metadata-server and accelerator-type warnings, and lets several processes compile at once
  (each variable set only where unset). Does nothing on a TPU VM."""
  if has_tpu_chips():
    return
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compiling needs no exclusive hold on chips: let several processes load libtpu at once
  # (otherwise the second waits on /tmp/libtpu_lockfile and fails).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` slices of `name` (each device has .slice_index).
  Needs libtpu (`pip install .[tpu]`); raises TpuCompilerError saying so when it is missing."""
  slice_ = parse_topology(name)
  quiet_libtpu_env()
  if not has_tpu_chips():  # after runtime set-up (it reads this variable as a cluster sign)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=slice_.topology_name,
        # megacore: one device per chip (its two TensorCores as one), as JAX runs v4 and v5p
        chip_config_name="megacore" if slice_.chip.megacore else "default",
        chips_per_host_bounds=slice_.chips_per_host, num_slices=int(num_slices),
        wrap=slice_.wrap)
  except Exception as e:  # pylint: disable=broad-except
    import importlib.util  # pylint: disable=import-outside-toplevel
    if importlib.util.find_spec("libtpu") is None:
      raise TpuCompilerError(f"compiling for {name} needs the TPU compiler (libtpu): "
                         "pip install -e '.[tpu]' (it runs on any machine, no TPU needed)") from e
    raise TpuCompilerError(f"libtpu could not describe topology {slice_.topology_name} "
                       f"x {num_slices} slice(s): {e}") from e
  return list(topo.devices)
