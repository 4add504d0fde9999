"""Shared test set-up: 8 virtual CPU devices (sharding tests), quiet TF, the real data paths."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HCP_DIR = SHARED_DATA / "hcp_rest_aal94"
A424_COORDS = SHARED_DATA / "atlases" / "A424" / "A424_Coordinates.dat"


@pytest.fixture
def hcp_dir():
  if not HCP_DIR.is_dir():
    pytest.skip(f"real data not found at {HCP_DIR}")
  return HCP_DIR
