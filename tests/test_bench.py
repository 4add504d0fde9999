"""`brainlm-bench`: one real-data step of ours and of the PyTorch peer, with FLOPs and MFU."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

from brainlm_jax import bench


def test_bench_tiny_vs_torch_on_real_recordings(hcp_dir, tmp_path):
  pytest.importorskip("transformers")
  out = tmp_path / "bench.json"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "-m", "brainlm_jax.cli.bench", "--config", "configs/pretrain.py:tiny",
       f"--config.data.path={hcp_dir}", "--steps", "2", "--warmup", "1", "--vs-torch",
       "--json", str(out)],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  ours, peer = result["rows"]
  assert "recordings in" in ours["data"], ours["data"]  # the real windows, not N(0, 1)
  for row in (ours, peer):
    assert row["step_s"] > 0 and row["samples_per_s"] > 0
    assert 0 < row["mfu"] < 1, row  # against the CPU's measured matmul peak
  # Same widths and depths at about the same token count: the two FLOP counters (XLA's cost
  # analysis, torch's FlopCounterMode) must roughly agree.
  assert 0.5 < ours["flops_per_step"] / peer["flops_per_step"] < 2.0
  assert result["ratios"]["samples_per_s"] > 0
  assert "MFU against" in r.stdout and "FlopCounterMode" in r.stdout


def test_peer_flops_counts_a_dense_layer_exactly():
  """A ViTMAE with one 32-wide layer each side on 4 x 4 patches, counted by hand."""
  pytest.importorskip("transformers")
  shape = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, decoder_hidden_size=32,
               decoder_num_layers=1, decoder_num_heads=2, decoder_mlp_dim=64, image_size=64,
               patch_size=16, batch=2, mask_ratio=0.75, dtype="float32")
  n, keep, d, m, p = 16, 4, 32, 64, 16 * 16  # tokens, visible, width, MLP, pixels per patch

  def layer(t):  # q, k, v, out projections + MLP + attention scores and mixing, per sample
    return t * (4 * d * d + 2 * d * m) + 2 * t * t * d

  embed = n * p * d  # HF embeds every patch before masking; pixels need no gradient (1 + 1)
  enc = layer(1 + keep)
  dec = (1 + keep) * d * d + layer(1 + n) + (1 + n) * d * p  # embed, layer, pixel head
  # MAC = 2 FLOPs; backward = 2x forward (input and weight gradients), 1x for the patch embed.
  expected = 2 * shape["batch"] * (2 * embed + 3 * (enc + dec))
  assert bench.peer_flops(shape) == pytest.approx(expected, rel=0.02)
