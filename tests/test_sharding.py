"""The same training on 1 device and on 8 (data x fsdp x tensor) gives the same losses."""

import jax
import ml_collections
import numpy as np
import pytest

from brainlm_jax.models import build_model
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.training import steps as steps_lib
from configs import pretrain


def _config():
  c = pretrain.get_config("tiny")
  c.train.batch_size = 8
  c.train.num_steps = 10
  c.train.warmup_steps = 2
  c.masking.ratio = 0.5
  return c


MCFG = ModelConfig(num_parcels=12, window=40, patch_len=10, hidden_size=32, num_layers=2,
                   num_heads=4, mlp_dim=64, decoder_hidden_size=32, decoder_num_layers=1,
                   decoder_num_heads=2, decoder_mlp_dim=64, spatial="learned", attention="xla")


def _run(mesh_dims, steps=3, accum=1):
  config = _config()
  config.train.grad_accum_steps = accum
  devices = jax.devices()[: int(np.prod(list(mesh_dims.values())))]
  mesh = sharding.create_mesh(ml_collections.ConfigDict(mesh_dims), devices)
  tx = state_lib.make_optimizer(config.train)
  state, shardings = state_lib.create_train_state(MCFG, tx, mesh, seed=0)
  with sharding.use_mesh(mesh):
    step_fn = steps_lib.make_train_step(build_model(MCFG), tx, config, mesh, shardings)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
      batch = {"signal": rng.standard_normal((8, 12, 40)).astype(np.float32)}
      state, m = step_fn(state, steps_lib.to_global(batch, mesh), None)
      losses.append(float(m["train_loss"]))
  return np.array(losses), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single():
  return _run({"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("dims", [{"data": 4, "fsdp": 2, "tensor": 1},
                                  {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_matches_single_device(single, dims):
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  losses, params, state = _run(dims)
  np.testing.assert_allclose(losses, single[0], rtol=2e-5)
  # Adam divides by sqrt(v): near-zero gradients turn reduction-order rounding into update
  # noise of up to ~lr/10, so parameters are compared at a fraction of one step's size (lr 1e-3).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4),
                         params, single[1])
  # Parameters really are sharded: an MLP kernel [embed, mlp] splits over fsdp (and tensor).
  kernel = state.params["encoder"]["layer_0"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  shard_shape = kernel.addressable_shards[0].data.shape
  assert shard_shape == (32 // dims["fsdp"], 64 // dims["tensor"])


def test_gradient_accumulation_matches_full_batch(single):
  losses, params, _ = _run({"data": 1, "fsdp": 1, "tensor": 1}, accum=2)
  # Masks are drawn per micro-batch, so losses differ slightly; training still matches closely.
  np.testing.assert_allclose(losses[0], single[0][0], rtol=0.05)
  assert np.isfinite(losses).all()


def test_mesh_errors():
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="slots"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  config = _config()
  config.train.batch_size = 6
  config.mesh.fsdp = 4
  with pytest.raises(ValueError, match="batch_size=6"):
    state_lib.validate_config(config, 8)
