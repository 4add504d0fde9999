"""Memory: FSDP really shards the 650m preset (compiled for 8 devices, never run: each device's
parameter + optimizer-state arguments are ~1/8 of the unsharded total); brainlm-pretrain refuses
a batch that does not fit before its first step."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainlm_jax.cli import common
from brainlm_jax.models import build_model
from brainlm_jax.training import memory
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.training import steps as steps_lib
from brainlm_jax.training.pretrain import train_and_evaluate
from configs import pretrain
from tests.conftest import tiny_config


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def test_650m_fsdp8_state_per_device_is_an_eighth():
  assert jax.device_count() >= 8
  c = pretrain.get_config("650m")  # scan_layers=True, remat='dots': compile time flat in depth
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 1, 8, 8
  c.train.batch_size = 8
  state_lib.validate_config(c, 8)
  mcfg = state_lib.model_config(c, num_parcels=424, has_coords=True)  # A424, window 200, patches 20
  mesh = sharding.create_mesh(c.mesh)
  tx = state_lib.make_optimizer(c.train)
  state, shardings = state_lib.abstract_train_state(mcfg, tx, mesh)
  batch = {"signal": jax.ShapeDtypeStruct((8, 424, mcfg.window), jnp.float32,
                                          sharding=sharding.batch_sharding(mesh, 3))}
  coords = jax.ShapeDtypeStruct((424, 3), jnp.float32, sharding=sharding.replicated(mesh))
  with sharding.use_mesh(mesh):
    step = steps_lib.make_train_step(build_model(mcfg), tx, c, mesh, shardings)
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


def test_pretrain_refuses_a_batch_that_does_not_fit_before_running(hcp_dir, tmp_path, monkeypatch):
  """brainlm-pretrain reads the compiled step's memory analysis before the first step: with less
  memory than batch 8 needs it stops with one line (needed, available, a batch that fits) and
  writes no checkpoint; with that batch it would fit."""

  needs = {}
  real_check = memory.check_fits

  def spy(compiled, batch, **kw):
    needs[batch] = memory.step_bytes(compiled.memory_analysis())
    return real_check(compiled, batch, **kw)

  # What batch 8 and batch 2 need, with the real budget (they fit).
  monkeypatch.setattr(memory, "check_fits", spy)
  for batch in (8, 2):
    c = tiny_config(hcp_dir, steps=1)
    c.train.batch_size = batch
    train_and_evaluate(c, str(tmp_path / f"fits{batch}"), stop_at_step=0)
  assert needs[2] < needs[8]
  budget = int((needs[2] + needs[8]) / 2 / memory.HEADROOM)  # batch 2 fits, batch 8 does not
  monkeypatch.setattr(memory, "check_fits", real_check)
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: (budget, "test"))

  with pytest.raises(memory.OutOfMemory) as err:
    train_and_evaluate(tiny_config(hcp_dir, steps=1), str(tmp_path / "lib"))
  assert 2 <= err.value.fitting_batch < 8, err.value.fitting_batch
  ckpts = tmp_path / "lib" / "checkpoints"
  assert not ckpts.is_dir() or not os.listdir(ckpts)  # nothing written

  # What brainlm-pretrain's main does with it: one line, no traceback.
  main = common.main_with_clear_errors(
      lambda argv: train_and_evaluate(tiny_config(hcp_dir, steps=1), str(tmp_path / "cli")),
      "brainlm-pretrain")
  with pytest.raises(SystemExit) as exit_:
    main(["brainlm-pretrain"])
  message = str(exit_.value.code)
  assert "\n" not in message and "Traceback" not in message
  assert re.search(r"^brainlm-pretrain: error: the train step at batch 8 needs [\d.]+ [MG]iB per "
                   r"device but [\d.]+ [MG]iB is available \(test\); batch \d+ should fit "
                   r"\(--config\.train\.batch_size=\d+\)$", message), message
