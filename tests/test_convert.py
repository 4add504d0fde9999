"""brainlm-convert: BrainLM's released HF checkpoints (both families) run in our variants.

Random-init PyTorch models with the released key names (family a: a reference of the brainlm_mae
forward built on HF's NystromformerLayer; family b: transformers' ViTMAEForPreTraining) are
saved as HF directories, converted, and run on the same input and mask as the PyTorch module.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests import torch_reference_brainlm as ref  # noqa: E402
from tests.conftest import A424_COORDS, REPO  # noqa: E402

from brainlm_jax.models import build_model, token_grid  # noqa: E402
from brainlm_jax.models import brainlm_nystrom, vitmae_image  # noqa: E402
from brainlm_jax.models.brainlm import BrainLM  # noqa: E402
from brainlm_jax.models.masking import Masking  # noqa: E402
from brainlm_jax.tools import convert  # noqa: E402
from brainlm_jax.transfer import functions  # noqa: E402
from brainlm_jax.transfer.run import load_pretrained  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def _randomize(module, seed=0):
  """Every parameter random (LayerNorms too), so a mis-mapped tensor cannot hide."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)
  return module.eval()


def _masking(noise: np.ndarray, keep: int, grid: tuple[int, int]) -> Masking:
  """The HF/BrainLM shuffle masking of `noise` [B, N]: visible ids in noise order (unsorted)."""
  ids_keep = np.argsort(noise, axis=1, kind="stable")[:, :keep].astype(np.int32)
  mask = np.ones(noise.shape, np.float32)
  np.put_along_axis(mask, ids_keep, 0.0, axis=1)
  return Masking(ids_keep=jnp.asarray(ids_keep),
                 mask=jnp.asarray(mask.reshape(noise.shape[0], *grid)))


def _run_brainlm_mae(tmp_path, hf_cfg, *, safetensors=True, seed=0):
  torch.manual_seed(seed)
  model = _randomize(ref.BrainLMReference(hf_cfg), seed)
  hf_dir = ref.save_hf_dir(model, str(tmp_path / "hf"), safetensors=safetensors)
  hf, state, _ = convert.read_hf_dir(hf_dir)
  cfg = convert.model_config_from_hf(hf)
  params, report = convert.convert_params(cfg, state)

  rng = np.random.default_rng(seed)
  b, p, w = 2, cfg.num_parcels, cfg.window
  signal = rng.normal(size=(b, p, w)).astype(np.float32)
  xyz = rng.uniform(-60, 60, size=(p, 3)).astype(np.float32)
  n = p * cfg.num_patches
  noise = rng.uniform(size=(b, n)).astype(np.float32)
  with torch.no_grad():
    want_pred, want_latent, want_mask = model(
        torch.from_numpy(signal), torch.from_numpy(np.broadcast_to(xyz, (b, p, 3)).copy()),
        torch.from_numpy(noise))
  keep = int(n * (1 - hf_cfg["mask_ratio"]))
  masking = _masking(noise, keep, token_grid(cfg))
  np.testing.assert_array_equal(np.asarray(masking.mask).reshape(b, n), want_mask.numpy())
  pred, latent = build_model(cfg).apply({"params": params}, signal, xyz, masking)
  return (np.asarray(pred), np.asarray(latent)), (want_pred.numpy(), want_latent.numpy()), report


def test_brainlm_mae_matches_pytorch(tmp_path):
  """The released configuration (landmarks == segment_means_seq_len: exact attention, value
  convolution), visible tokens in shuffle order, half masked."""
  (pred, latent), (want_pred, want_latent), report = _run_brainlm_mae(
      tmp_path, ref.brainlm_config())
  assert pred.shape == want_pred.shape == (2, 12, 4, 10)
  np.testing.assert_allclose(latent, want_latent, **TOL)
  np.testing.assert_allclose(pred, want_pred, **TOL)
  assert sorted(report["unused"]) == ["decoder.decoder_pred.bias", "decoder.decoder_pred.weight",
                                      "decoder.pos_embedding.pe",
                                      "vit.embeddings.pos_embedding.pe"]
  assert report["checked_buffers"] and not report["zero_filled"]
  assert report["mapped"]["encoder/layer_1/attention/conv"] == (
      "vit.encoder.layer.1.attention.self.conv.weight")


def test_brainlm_mae_nystrom_landmarks_match_pytorch(tmp_path):
  """Approximate (landmark) attention: HF's segment means need the sequence to be exactly
  segment_means_seq_len, so no masking: 5 parcels x 3 patches + CLS = 16 tokens, 4 landmarks;
  .bin weights read with torch.load(weights_only=True)."""
  hf_cfg = ref.brainlm_config(num_brain_voxels=5, num_timepoints_per_voxel=30, mask_ratio=0.0,
                              num_landmarks=4, segment_means_seq_len=16, conv_kernel_size=3)
  (pred, latent), (want_pred, want_latent), _ = _run_brainlm_mae(
      tmp_path, hf_cfg, safetensors=False, seed=1)
  np.testing.assert_allclose(latent, want_latent, **TOL)
  np.testing.assert_allclose(pred, want_pred, **TOL)


def test_iterative_pinv_converges():
  """The Nystrom pseudo-inverse of softmax matrices converges to the inverse."""
  rng = np.random.default_rng(0)
  m = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 6, 6)), jnp.float32), axis=-1)
  z = brainlm_nystrom.iterative_pinv(m, n_iter=20)
  np.testing.assert_allclose(np.asarray(m @ z), np.broadcast_to(np.eye(6), m.shape), atol=1e-3)


def _vitmae(tmp_path, seed=0):
  # pylint: disable-next=import-outside-toplevel
  from transformers import ViTMAEConfig, ViTMAEForPreTraining
  hf_cfg = ViTMAEConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
      decoder_intermediate_size=32, image_size=16, patch_size=4, num_channels=3, mask_ratio=0.75)
  torch.manual_seed(seed)
  model = ViTMAEForPreTraining(hf_cfg).eval()
  # Transformers 5.x's constructor leaves the fixed sin-cos positions at zero: fill them with
  # its own initialisers, as the released (4.x-trained) checkpoints hold them.
  model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
  model.vit.embeddings.initialize_weights()
  model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)
  with torch.no_grad():  # random everything except the fixed sin-cos positions
    for name, p in model.named_parameters():
      if "pos_embed" not in name and "position_embeddings" not in name:
        p.copy_(torch.randn(p.shape) * 0.3)
  hf_dir = str(tmp_path / "vitmae")
  model.save_pretrained(hf_dir)
  return model, hf_dir


def test_vitmae_matches_transformers(tmp_path):
  model, hf_dir = _vitmae(tmp_path)
  hf, state, files = convert.read_hf_dir(hf_dir)
  assert files == ["model.safetensors"]
  cfg = convert.model_config_from_hf(hf, num_parcels=12, window=10, value_scale=2.0)
  params, report = convert.convert_params(cfg, state)
  assert not report["unused"] and len(report["mapped"]) == len(state)
  np.testing.assert_allclose(  # our fixed positions are HF's
      vitmae_image.sincos_2d(32, 4), state["vit.embeddings.position_embeddings"][0], atol=1e-6)

  rng = np.random.default_rng(0)
  signal = rng.normal(size=(2, 12, 10)).astype(np.float32)
  coords = rng.uniform(-60, 60, size=(12, 3)).astype(np.float32)
  images = np.asarray(vitmae_image.signal_to_image(signal, coords, image_size=16,
                                                   value_scale=2.0))
  noise = rng.uniform(size=(2, 16)).astype(np.float32)
  with torch.no_grad():
    images = images.copy()
    out = model(torch.from_numpy(images), noise=torch.from_numpy(noise))
    want_latent = model.vit(torch.from_numpy(images), noise=torch.from_numpy(noise))
  masking = _masking(noise, 4, token_grid(cfg))
  np.testing.assert_array_equal(np.asarray(masking.mask).reshape(2, 16), out.mask.numpy())
  pixels, latent = build_model(cfg).apply({"params": params}, signal, coords, masking)
  np.testing.assert_allclose(np.asarray(latent), want_latent.last_hidden_state.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(pixels), out.logits.numpy(), **TOL)

  # The in-memory Transformers 5.x names (vit.layers.N.attention.q_proj, mlp.fc1, ...) convert
  # to the same params as the saved (4.x-style) names.
  live = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert "vit.layers.0.attention.q_proj.weight" in live
  params_live, _ = convert.convert_params(cfg, live)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_live, params)


def test_recording_image_round_trip():
  """Rows by Y, scaled, padded (-1) to a square, 3 channels; image_to_signal inverts it."""
  rng = np.random.default_rng(0)
  window = rng.normal(size=(6, 5)).astype(np.float32)  # [time, parcels]
  coords = np.array([[0, 3, 0], [0, -1, 0], [0, 2, 0], [0, -1, 5], [0, 0, 0]], np.float32)
  img = vitmae_image.recording_to_image(window, coords, image_size=8, value_scale=2.0)
  assert img.shape == (3, 8, 8)
  np.testing.assert_array_equal(img[0], img[2])
  order = [1, 3, 4, 2, 0]  # ascending Y, ties in atlas order
  np.testing.assert_allclose(img[0, 1:6, 1:7], window.T[order] / 2.0)
  assert (img[0, 0] == -1).all() and (img[0, :, 7] == -1).all() and (img[0, 6:] == -1).all()
  back = vitmae_image.image_to_signal(jnp.asarray(img)[None], coords, 5, 6, value_scale=2.0)
  np.testing.assert_allclose(np.asarray(back)[0], window.T, rtol=1e-6)


def test_convert_writes_checkpoint_that_load_pretrained_embeds(tmp_path):
  """Family (a) at A424 size with the real coordinates: convert() -> load_pretrained -> embed,
  equal to encoding with the converted params directly."""
  if not A424_COORDS.is_file():
    pytest.skip(f"real data not found at {A424_COORDS}")
  from brainlm_jax.data.readers import load_coordinates  # pylint: disable=import-outside-toplevel
  coords = load_coordinates(A424_COORDS)
  hf_cfg = ref.brainlm_config(num_brain_voxels=424, num_timepoints_per_voxel=20,
                              num_hidden_layers=1)
  torch.manual_seed(0)
  hf_dir = ref.save_hf_dir(_randomize(ref.BrainLMReference(hf_cfg)), str(tmp_path / "hf"))
  out = tmp_path / "converted"
  report = convert.convert(hf_dir, str(out), coords=coords, coords_path=str(A424_COORDS))
  saved = json.loads((out / "convert_report.json").read_text())
  assert saved["variant"] == "brainlm_nystrom" and saved["num_mapped"] == report["num_mapped"]
  pre = load_pretrained(str(out))
  assert pre.model_cfg.variant == "brainlm_nystrom" and pre.step == 0
  np.testing.assert_allclose(pre.coords, coords)

  rec = np.random.default_rng(0).normal(size=(45, 424)).astype(np.float32)  # [time, parcels]
  emb = functions.embed(pre, [rec], batch_size=4)
  assert emb["cls"].shape == (2, 32) and np.isfinite(emb["mean"]).all()
  _, state, _ = convert.read_hf_dir(hf_dir)
  params, _ = convert.convert_params(pre.model_cfg, state)
  cls, mean = functions.encode_fn(pre.model_cfg)(params, rec[:20].T[None], coords)
  np.testing.assert_allclose(emb["cls"][0], np.asarray(cls)[0], **TOL)
  np.testing.assert_allclose(emb["mean"][0], np.asarray(mean)[0], **TOL)


def _hf_values(images: np.ndarray, coords: np.ndarray, num_parcels: int, window: int,
               value_scale: float) -> np.ndarray:
  """BrainLM's reading of a ViTMAE image [B, C, S, S] as values [B, P, W]: channel mean, the
  padding cropped, times value_scale, rows back from ascending-Y order to atlas order."""
  s = images.shape[-1]
  top, left = (s - num_parcels) // 2, (s - window) // 2
  rows = images.mean(axis=1)[:, top:top + num_parcels, left:left + window] * value_scale
  out = np.empty_like(rows)
  out[:, np.argsort(coords[:, 1], kind="stable")] = rows
  return out


@pytest.mark.parametrize("family", ["brainlm_mae", "vit_mae"])
def test_converted_checkpoint_reconstructs_through_the_transfer_layer(tmp_path, family):
  """convert() -> load_pretrained -> the transfer layer's reconstruct_fn with a fixed masking:
  the per-value predictions equal the PyTorch model's on the same inputs and mask. (Regression:
  evaluate/visualize once built the plain BrainLM for every checkpoint, so imported weights ran
  through the wrong network.)"""
  rng = np.random.default_rng(3)
  b = 2
  if family == "brainlm_mae":
    hf_cfg = ref.brainlm_config()
    torch.manual_seed(3)
    model = _randomize(ref.BrainLMReference(hf_cfg), seed=3)
    hf_dir = ref.save_hf_dir(model, str(tmp_path / "hf"))
    p, w = hf_cfg["num_brain_voxels"], hf_cfg["num_timepoints_per_voxel"]
    coords = rng.uniform(-60, 60, size=(p, 3)).astype(np.float32)
    overrides = None
  else:
    model, hf_dir = _vitmae(tmp_path, seed=3)
    p, w = 12, 10
    coords = rng.uniform(-60, 60, size=(p, 3)).astype(np.float32)
    overrides = {"num_parcels": p, "window": w, "value_scale": 2.0}
  report = convert.convert(hf_dir, str(tmp_path / "out"), coords=coords,
                           vitmae_overrides=overrides)
  pre = load_pretrained(str(tmp_path / "out"))
  cfg = pre.model_cfg
  assert cfg.variant == report["variant"] == convert.FAMILIES[family]
  np.testing.assert_allclose(pre.coords, coords)

  signal = rng.normal(size=(b, p, w)).astype(np.float32)
  rows, cols = token_grid(cfg)
  noise = rng.uniform(size=(b, rows * cols)).astype(np.float32)
  with torch.no_grad():
    if family == "brainlm_mae":
      out = model(torch.from_numpy(signal),
                  torch.from_numpy(np.broadcast_to(coords, (b, p, 3)).copy()),
                  torch.from_numpy(noise))
      want = out[0].numpy().reshape(b, p, w)
      token_mask = out[2].numpy()
      want_mask = np.repeat(token_mask.reshape(b, p, -1), cfg.patch_len, axis=-1)
    else:
      images = np.asarray(vitmae_image.signal_to_image(
          signal, coords, image_size=cfg.image_size, value_scale=cfg.value_scale))
      out = model(torch.from_numpy(images.copy()), noise=torch.from_numpy(noise))
      want = _hf_values(model.unpatchify(out.logits).numpy(), coords, p, w, cfg.value_scale)
      token_mask = out.mask.numpy()
      pixel_mask = model.unpatchify(
          out.mask[..., None].repeat(1, 1, cfg.patch_len ** 2 * cfg.image_channels)).numpy()
      want_mask = _hf_values(pixel_mask, coords, p, w, 1.0)
  keep = int((token_mask[0] == 0).sum())
  masking = _masking(noise, keep, (rows, cols))
  np.testing.assert_array_equal(np.asarray(masking.mask).reshape(b, -1), token_mask)

  pred, mask = functions.reconstruct_fn(cfg)(pre.params, signal, jnp.asarray(pre.coords),
                                             masking)
  assert pred.shape == mask.shape == (b, p, w)
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  np.testing.assert_allclose(np.asarray(pred), want, **TOL)
  if family == "brainlm_mae":
    # The check discriminates: the plain BrainLM (pre-LN, no value convolution) on the same
    # weights reconstructs something else.
    plain, _ = BrainLM(cfg).apply({"params": pre.params}, signal, jnp.asarray(pre.coords),
                                  masking, method=BrainLM.reconstruct)
    assert not np.allclose(np.asarray(plain), want, **TOL)


def test_clear_errors(tmp_path):
  with pytest.raises(convert.ConvertError, match="config.json: missing"):
    convert.read_hf_dir(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
  with pytest.raises(convert.ConvertError, match="no weights file"):
    convert.read_hf_dir(str(tmp_path))
  with pytest.raises(convert.ConvertError, match="model_type='bert'"):
    convert.model_config_from_hf({"model_type": "bert"})
  with pytest.raises(convert.ConvertError, match="decoder_hidden_size"):
    convert.model_config_from_hf(ref.brainlm_config(decoder_hidden_size=16))
  cfg = convert.model_config_from_hf(ref.brainlm_config())
  torch.manual_seed(0)
  state = {k: v.numpy() for k, v in ref.BrainLMReference(ref.brainlm_config()).state_dict().items()}
  state["vit.layernorm.weight"] = state["vit.layernorm.weight"][:5]
  del state["decoder.mask_token"]
  with pytest.raises(convert.ConvertError) as e:
    convert.convert_params(cfg, state)
  assert "vit.layernorm.weight: shape (5,)" in str(e.value)
  assert "mask_token: missing from the checkpoint" in str(e.value)


def test_cli(tmp_path):
  torch.manual_seed(0)
  hf_dir = ref.save_hf_dir(ref.BrainLMReference(ref.brainlm_config()), str(tmp_path / "hf"))
  coords = tmp_path / "coords.txt"
  np.savetxt(coords, np.random.default_rng(0).normal(size=(12, 3)) * 50)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cmd = [sys.executable, "-m", "brainlm_jax.cli.convert", f"--hf-dir={hf_dir}",
         f"--out={tmp_path / 'out'}", f"--coords={coords}"]
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "unused: decoder.decoder_pred.weight" in run.stdout
  assert (tmp_path / "out" / "checkpoints" / "0" / "state").is_dir()
  bad_dir = tmp_path / "bert"
  bad_dir.mkdir()
  (bad_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
  (bad_dir / "model.safetensors").write_bytes(b"")
  bad = subprocess.run(cmd[:3] + [f"--hf-dir={bad_dir}", f"--out={tmp_path / 'o2'}",
                                  f"--coords={coords}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert "brainlm-convert: error:" in bad.stderr and "model_type='bert'" in bad.stderr
