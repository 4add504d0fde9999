"""`brainlm-bench`: one real-data step of ours and of the PyTorch peer, with FLOPs and MFU."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

from brainlm_jax.tools import torch_peer


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
  assert torch_peer.peer_flops(shape) == pytest.approx(expected, rel=0.02)


# A memory budget in bytes far below what the tiny step needs at batch 16 (about 0.3 GiB on CPU:
# ~18 MiB per sample, ~2 MiB of parameters and optimizer state) and above what it needs at 1.
SMALL_BUDGET = 64 * 2 ** 20


def test_bench_runs_a_fitting_batch_when_the_requested_one_does_not_fit():
  """The compiled step's memory analysis is read before anything runs: a batch that would not
  fit is not run, the largest that fits is benchmarked instead and the row says so."""
  from brainlm_jax.tools import bench  # pylint: disable=import-outside-toplevel
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  config = pretrain.get_config("tiny")
  config.data.path = ""  # synthetic N(0, 1) windows, random coordinates
  config.mesh.num_devices = 1
  config.train.batch_size = 16
  row = bench.bench_train_step(config, steps=1, warmup=1, num_parcels=94,
                               available=SMALL_BUDGET)
  assert row["batch_requested"] == 16 and 1 <= row["batch"] < 16, row["batch"]
  assert row["data"].startswith("N(0,1)")
  note = row["batch_note"]
  assert re.search(r"at batch 16 needs [\d.]+ [MG]iB per device but [\d.]+ [MG]iB is available "
                   r"\(given\)", note), note
  assert f"benchmarking batch {row['batch']} instead of 16" in note, note
  assert row["step_s"] > 0 and row["samples_per_s"] > 0
  print(f"batch {row['batch']}: {row['step_memory_mib']:.1f} MiB; {note}")
  assert row["step_memory_mib"] * 2 ** 20 <= SMALL_BUDGET  # what ran fits the budget


def test_check_fits_names_no_batch_when_nothing_fits():
  """Even the state alone exceeds the budget: OutOfMemory, one line, no fitting batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import memory  # pylint: disable=import-outside-toplevel
  x = np.zeros((8, 256, 256), np.float32)  # 2 MiB
  compiled = jax.jit(lambda a: (a @ a).sum()).lower(x).compile()
  need = memory.step_bytes(compiled.memory_analysis())
  if need is None:
    pytest.skip("this backend reports no memory analysis")
  assert need >= x.nbytes
  # Fits: the bytes needed are returned.
  assert memory.check_fits(compiled, 8, what="step", state_bytes=0, available=4 * need) == need
  with pytest.raises(memory.OutOfMemory) as e:
    memory.check_fits(compiled, 8, what="the toy step at batch 8", state_bytes=x.nbytes,
                      available=x.nbytes // 2)
  message = str(e.value)
  assert e.value.fitting_batch == 0 and isinstance(e.value, MemoryError)
  assert "\n" not in message
  assert message.startswith("the toy step at batch 8 needs "), message
  assert re.search(r"needs [\d.]+ [MG]iB per device but [\d.]+ [MG]iB is available \(given\); "
                   r"no batch fits", message), message
