"""Presets: they build, validate, and have the parameter counts the config docstring states."""

import jax
import pytest

from brainlm_jax.models import build_model
from brainlm_jax.models.brainlm import count_params
from brainlm_jax.training import state as state_lib
from configs import pretrain

# Measured with jax.eval_shape (no memory allocated); the docstring of configs/pretrain.py quotes
# these. tiny: 94 HCP parcels, abide: 200 CC200 parcels, hcp: 68 DK regions, with a learned
# table; the others: A424 with XYZ coordinates.
EXPECTED = {"tiny": (94, False, 0.12e6, 0.13e6), "abide": (200, False, 0.13e6, 0.14e6),
            "hcp": (68, False, 0.11e6, 0.13e6),
            "13m": (424, True, 4.7e6, 4.9e6),
            "111m": (424, True, 105e6, 115e6), "650m": (424, True, 640e6, 670e6)}


def _num_params(preset):
  c = pretrain.get_config(preset)
  parcels, coords, _, _ = EXPECTED[preset]
  mcfg = state_lib.model_config(c, parcels, coords)
  sig, co, mk = state_lib.dummy_inputs(mcfg)
  shapes = jax.eval_shape(lambda: build_model(mcfg).init(jax.random.PRNGKey(0), sig, co, mk))
  return count_params(shapes["params"])


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_parameter_counts(preset):
  n = _num_params(preset)
  lo, hi = EXPECTED[preset][2:]
  print(f"{preset}: {n:,} parameters")
  assert lo <= n <= hi, f"{preset}: {n:,}"


def test_13m_is_the_released_brainlm_shape():
  m = pretrain.get_config("13m").model
  assert (m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim) == (256, 4, 4, 1024)
  assert (m.decoder_hidden_size, m.decoder_num_layers, m.decoder_num_heads,
          m.decoder_mlp_dim) == (256, 2, 4, 1024)
  assert (m.window, m.patch_len) == (200, 20)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_presets_validate_on_8_devices(preset):
  c = pretrain.get_config(preset)
  c.train.batch_size = 64
  state_lib.validate_config(c, 8)


def test_config_errors_are_collected():
  c = pretrain.get_config("tiny")
  c.data.window = 190
  c.model.num_heads = 3
  c.mesh.tensor = 3
  with pytest.raises(ValueError) as e:
    state_lib.validate_config(c, 8)
  msg = str(e.value)
  assert "not divisible by model.patch_len=20" in msg
  assert "num_heads" in msg and "mesh" in msg
  with pytest.raises(ValueError, match="Unknown preset"):
    pretrain.get_config("7b")
