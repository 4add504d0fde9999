"""FSDP really shards the 650m preset: compiled for 8 devices (never run, nothing allocated),
each device's parameter + optimizer-state arguments are ~1/8 of the unsharded total."""

import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax import bench
from brainlm_jax import sharding
from brainlm_jax import train
from brainlm_jax.model import BrainLM
from configs import pretrain


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def test_650m_fsdp8_state_per_device_is_an_eighth():
  assert jax.device_count() >= 8
  c = pretrain.get_config("650m")  # scan_layers=True, remat='dots': compile time flat in depth
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 1, 8, 8
  c.train.batch_size = 8
  train.validate_config(c, 8)
  mcfg = train.model_config(c, num_parcels=424, has_coords=True)  # A424, window 200, patches 20
  mesh = sharding.create_mesh(c.mesh)
  tx = train.make_optimizer(c.train)
  state, shardings = bench.abstract_train_state(mcfg, tx, mesh)
  batch = {"signal": jax.ShapeDtypeStruct((8, 424, mcfg.window), jnp.float32,
                                          sharding=sharding.batch_sharding(mesh, 3))}
  coords = jax.ShapeDtypeStruct((424, 3), jnp.float32, sharding=sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    step = train.make_train_step(BrainLM(mcfg), tx, c, mesh, shardings)
    compiled = step.lower(state, batch, coords).compile()
  mem = compiled.memory_analysis()

  params = _bytes(state.params)
  assert 640e6 < params / 4 < 670e6  # the 650m preset (655.7M float32 parameters)
  total = _bytes((state.params, state.opt_state))  # params + Adam mu, nu (+ scalars)
  # Per-device argument bytes of the partitioned executable: the state shard plus this device's
  # batch rows (1 of 8) and the replicated coordinates.
  inputs = 8 // 8 * 424 * mcfg.window * 4 + 424 * 3 * 4
  per_device_state = mem.argument_size_in_bytes - inputs
  print(f"650m fsdp=8: state {total / 2**30:.2f} GiB unsharded, {per_device_state / 2**30:.3f} GiB "
        f"per device ({per_device_state / total * 8:.3f}/8); XLA temp "
        f"{mem.temp_size_in_bytes / 2**30:.2f} GiB per device")
  assert per_device_state <= 1.15 / 8 * total, (per_device_state, total)
  assert per_device_state >= 0.99 / 8 * total  # and it is the state (not something smaller)
  # The same from the shardings themselves: every big leaf is split 8 ways.
  shard_bytes = sum(int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
                    for x, s in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                                    jax.tree_util.tree_leaves((shardings.params,
                                                               shardings.opt_state))))
  assert shard_bytes <= 1.15 / 8 * total
