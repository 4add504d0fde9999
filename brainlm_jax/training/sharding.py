"""The device mesh and the one mapping from logical tensor axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded, ZeRO-3 style), `tensor` (Megatron-style split of heads and MLP). The batch is
sharded over `data` x `fsdp`. Model code only names logical axes (see models/brainlm.py);
changing the parallelism never touches it.

Parameters get their shardings from `logical_to_shardings`; activations from the model's
`nn.with_logical_constraint` calls, which only act inside `use_mesh(mesh)` (the mesh and these
rules): every place that traces the model (init, train/eval steps, transfer functions) does so
inside it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None: replicated). Parameters first, then activations.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("patch", None),
    ("xyz", None),
    ("parcels", None),
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `{data, fsdp, tensor}` (one of them may be -1: 'the rest') to a shape."""
  dims = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(d == -1 for d in dims) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, dims))}")
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, dims))}")
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} does not divide {num_devices} devices")
    dims[dims.index(-1)] = num_devices // known
  if int(np.prod(dims)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} has {int(np.prod(dims))} slots but there "
                     f"are {num_devices} devices (set one axis to -1 to use them all)")
  return tuple(dims)  # type: ignore[return-value]


def global_mesh_shape(mesh_cfg: Any, num_devices: int,
                      num_slices: int = 1) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) shape over `num_devices` in `num_slices` TPU slices: `mesh_cfg`
  resolved over one slice's devices, its data axis repeated across the slices."""
  data, fsdp, tensor = mesh_shape(mesh_cfg, num_devices // max(num_slices, 1))
  return data * max(num_slices, 1), fsdp, tensor


def num_slices(devices: Sequence[jax.Device]) -> int:
  """TPU slices the devices span (multi-slice jobs talk across slices over the data-centre
  network); 1 on other platforms."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def create_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices of all hosts, or
  the first `mesh_cfg.num_devices` of them when that is set and > 0).

  Devices of several TPU slices: `mesh_cfg` describes one slice, and the `data` axis is
  multiplied by the slice count, its outer part running across slices (only the gradient
  all-reduce crosses the slower network; MaxText's DCN data parallelism)."""
  if devices is None:
    devices = jax.devices()
    n = int(mesh_cfg.get("num_devices", 0) or 0)
    if n:
      if n > len(devices):
        raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices exist")
      devices = devices[:n]
  devices = list(devices)
  slices = num_slices(devices)
  if slices > 1:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    data, fsdp, tensor = global_mesh_shape(mesh_cfg, len(devices), slices)
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1),
                                                devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    from jax.experimental import mesh_utils  # topology-aware order on TPU/GPU
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except  # CPU or odd topologies
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """Maps a tree holding `nn.Partitioned` leaves (or plain leaves) to NamedShardings."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_divisor(mesh: Mesh) -> int:
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """`jax.set_mesh(mesh)` with LOGICAL_AXIS_RULES active, so that the activation constraints the
  model names (`act_batch`, `act_heads`, ...) become sharding constraints on `mesh` when a
  function is traced inside this context (without the rules Flax drops them silently)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
  """A 1 x 1 x 1 mesh over one device (default: the first local one): where transfer jobs run
  the model on params restored to that device."""
  device = device or jax.local_devices()[0]
  return Mesh(np.asarray([device]).reshape(1, 1, 1), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
