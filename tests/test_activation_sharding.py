"""The model's activation constraints reach the compiled step on 8 virtual CPU devices.

`nn.with_logical_constraint` does nothing without `nn.logical_axis_rules` in scope; every
place that traces the model does so inside `sharding.use_mesh`, so the lowered train step and
the transfer functions carry a sharding constraint for each `act_*` rule the model names.
"""

import collections
import re

import jax
import ml_collections
import numpy as np
import pytest

from brainlm_jax.models import build_model
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.training import steps
from brainlm_jax.transfer import functions
from configs import pretrain

MCFG = ModelConfig(num_parcels=12, window=40, patch_len=10, hidden_size=32, num_layers=2,
                   num_heads=4, mlp_dim=64, decoder_hidden_size=32, decoder_num_layers=1,
                   decoder_num_heads=2, decoder_mlp_dim=64, spatial="learned", attention="xla")
BATCH = 8
# act_batch -> ("data", "fsdp"); act_heads / act_mlp -> "tensor"; act_len / act_embed replicated.
QKV = '[{"data", "fsdp"}, {}, {"tensor"}, {}]'  # [B, S, H, K]: q, k, v
RESIDUAL = '[{"data", "fsdp"}, {}, {}]'  # [B, S, D]: each block's input
MLP = '[{"data", "fsdp"}, {}, {"tensor"}]'  # [B, S, mlp]: the MLP's hidden layer


def _constraints(text: str) -> collections.Counter:
  """Counts the dimension shardings of the `sdy.sharding_constraint`s in lowered StableHLO."""
  found = re.findall(r"sdy\.sharding_constraint %\S+ <@\w+, (\[.*?\])>", text)
  return collections.Counter(found)


def _mesh(dims):
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  return sharding.create_mesh(ml_collections.ConfigDict(dims), jax.devices()[:8])


def _lowered_train_step(mesh, rules: bool = True):
  config = pretrain.get_config("tiny")
  config.train.batch_size = BATCH
  tx = state_lib.make_optimizer(config.train)
  abstract, shardings = state_lib.abstract_train_state(MCFG, tx, mesh)
  batch = {"signal": jax.ShapeDtypeStruct((BATCH, MCFG.num_parcels, MCFG.window), np.float32,
                                          sharding=sharding.batch_sharding(mesh, 3))}
  step = steps.make_train_step(build_model(MCFG), tx, config, mesh, shardings)
  if not rules:  # the mesh alone, as before the fix: Flax drops the constraints
    with jax.set_mesh(mesh):
      return step.lower(abstract, batch, None)
  with sharding.use_mesh(mesh):
    return step.lower(abstract, batch, None)


@pytest.mark.parametrize("dims", [{"data": 1, "fsdp": 8, "tensor": 1},
                                  {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_train_step_carries_activation_shardings(dims):
  mesh = _mesh(dims)
  lowered = _lowered_train_step(mesh)
  found = _constraints(lowered.as_text())
  blocks = MCFG.num_layers + MCFG.decoder_num_layers
  # Every encoder and decoder block constrains q, k, v, its input and its MLP hidden layer (the
  # backward pass repeats them): the batch over data x fsdp, heads and MLP over tensor.
  assert found[QKV] >= 3 * blocks, found
  assert found[RESIDUAL] >= blocks, found
  assert found[MLP] >= blocks, found
  # ... and the partitioner accepts them: the step compiles for this mesh.
  compiled = lowered.compile()
  assert "sharding" in compiled.as_text()


def test_without_rules_there_are_none():
  """The control: tracing under the mesh alone (what the code did before) loses them all."""
  found = _constraints(_lowered_train_step(_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                                           rules=False).as_text())
  assert not (found[QKV] or found[MLP]), found


def test_transfer_functions_carry_activation_shardings():
  """encode_fn runs on a one-device mesh, traced inside the rules: its constraints are there."""
  params = state_lib.abstract_params(MCFG)
  signal = jax.ShapeDtypeStruct((BATCH, MCFG.num_parcels, MCFG.window), np.float32)
  found = _constraints(functions.encode_fn(MCFG).lower(params, signal, None).as_text())
  assert found[QKV] >= 3 * MCFG.num_layers and found[MLP] >= MCFG.num_layers, found
  masking = masking_lib.no_masking(BATCH, MCFG.num_parcels, MCFG.num_patches)
  found = _constraints(functions.reconstruct_fn(MCFG).lower(params, signal, None,
                                                            masking).as_text())
  blocks = MCFG.num_layers + MCFG.decoder_num_layers
  assert found[QKV] >= 3 * blocks, found
