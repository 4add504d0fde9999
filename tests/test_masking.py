"""Masking modes mask exactly what they say."""

import jax
import numpy as np
import pytest

from brainlm_jax.models import masking


def _check_consistent(m, parcels, patches):
  b = m.mask.shape[0]
  visible = np.zeros((b, parcels * patches))
  np.put_along_axis(visible, np.asarray(m.ids_keep), 1.0, axis=1)
  np.testing.assert_array_equal(1.0 - visible.reshape(b, parcels, patches), np.asarray(m.mask))
  assert np.all(np.diff(np.asarray(m.ids_keep), axis=1) > 0), "ids_keep ascending and unique"


def test_parcel_mode_masks_same_count_in_every_parcel():
  m = masking.make_masking(jax.random.PRNGKey(0), 4, 11, 10, mode="parcel", ratio=0.7)
  _check_consistent(m, 11, 10)
  np.testing.assert_array_equal(np.asarray(m.mask.sum(-1)), 7.0)  # int(10 * 0.3) = 3 visible
  # different parcels get different patterns
  assert len({tuple(r) for r in np.asarray(m.mask[0])}) > 1


def test_uniform_mode_masks_fixed_count_per_sample():
  m = masking.make_masking(jax.random.PRNGKey(1), 3, 6, 10, mode="uniform", ratio=0.75)
  _check_consistent(m, 6, 10)
  np.testing.assert_array_equal(np.asarray(m.mask.sum((1, 2))), 60 - 15)
  assert np.asarray(m.mask.sum(-1)).std() > 0  # not balanced per parcel


def test_forecast_mode_masks_last_patches():
  m = masking.make_masking(jax.random.PRNGKey(2), 2, 5, 10, mode="forecast", ratio=0.0,
                           forecast_patches=3)
  _check_consistent(m, 5, 10)
  np.testing.assert_array_equal(np.asarray(m.mask[..., :7]), 0.0)
  np.testing.assert_array_equal(np.asarray(m.mask[..., 7:]), 1.0)


def test_masking_is_deterministic_in_rng():
  a = masking.make_masking(jax.random.PRNGKey(3), 2, 4, 10, mode="parcel", ratio=0.5)
  b = masking.make_masking(jax.random.PRNGKey(3), 2, 4, 10, mode="parcel", ratio=0.5)
  c = masking.make_masking(jax.random.PRNGKey(4), 2, 4, 10, mode="parcel", ratio=0.5)
  np.testing.assert_array_equal(a.ids_keep, b.ids_keep)
  assert not np.array_equal(a.ids_keep, c.ids_keep)


@pytest.mark.parametrize("kwargs", [dict(mode="bogus", ratio=0.5),
                                    dict(mode="parcel", ratio=1.0),
                                    dict(mode="forecast", ratio=0.0, forecast_patches=10)])
def test_bad_masking_arguments_raise(kwargs):
  with pytest.raises(ValueError):
    masking.make_masking(jax.random.PRNGKey(0), 1, 2, 10, **kwargs)
