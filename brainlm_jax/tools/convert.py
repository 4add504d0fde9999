"""Import BrainLM's released Hugging Face checkpoints as brainlm_jax checkpoints.

  read_hf_dir(DIR) -> (hf_config dict, {key: float32 ndarray}, weight file names)
  model_config_from_hf(hf_config, ...) -> ModelConfig      the variant that runs those weights
  convert_params(cfg, state_dict) -> (params, report)      every tensor mapped, or an error
  convert(hf_dir, out, coords=...) -> report                writes OUT/checkpoints/0/{state,meta}

Two families (docs/convert.md):
  model_type 'brainlm_mae' -> variant 'brainlm_nystrom' (the 13M BrainLM: XYZ + time embeddings,
      Nystromformer layers, decoder with its own XYZ projection, two-layer head).
  model_type 'vit_mae'     -> variant 'vitmae_image' (the 111M/650M models: a stock ViTMAE over
      the recording drawn as an image). Transformers 4.x key names (the released files), 5.x
      in-memory names and 5.x save_pretrained names are all read.

The checkpoint has the layout `brainlm-pretrain` writes (params, an empty optimizer state, meta
with config, model, scaler, coords), so `transfer.run.load_pretrained` (brainlm-probe, fine-tuning)
reads it. Nothing is guessed: a tensor of the wrong shape, a missing tensor, or a config option
the variant cannot run is a ConvertError naming it; tensors the network does not use are listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.data import datasets
from brainlm_jax.data.scaling import RobustScaler
from brainlm_jax.models import token_grid
from brainlm_jax.models.brainlm import ModelConfig, sinusoid_table
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training.state import TrainState, abstract_params

__all__ = ["ConvertError", "FAMILIES", "convert", "convert_params", "fit_scaler",
           "model_config_from_hf", "read_hf_dir"]

FAMILIES = {"brainlm_mae": "brainlm_nystrom", "vit_mae": "vitmae_image"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# BrainLM's ViTMAE inputs: A424 windows of 200 timepoints, scaled by its max_val_to_scale.
VITMAE_DEFAULTS = {"num_parcels": 424, "window": 200, "value_scale": 5.6430855, "pad_value": -1.0}


class ConvertError(ValueError):
  pass


# ----------------------------------------------------------------------------------------------
# Reading a Hugging Face directory.


def _load_weight_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise ConvertError(f"{path}: cannot read safetensors: {type(e).__name__}: {e}") from e
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConvertError(f"{path}: reading .bin weights needs PyTorch (pip install torch), or "
                       "convert them to model.safetensors") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConvertError(f"{path}: cannot read PyTorch weights: {type(e).__name__}: {e}") from e
  if not isinstance(sd, dict):
    raise ConvertError(f"{path}: expected a state dict, found a {type(sd).__name__}")
  return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def read_hf_dir(hf_dir: str) -> tuple[dict, dict[str, np.ndarray], list[str]]:
  """config.json (model_type brainlm_mae | vit_mae) + model.safetensors | pytorch_model.bin (or
  their sharded *.index.json) -> (config, {key: float32 array}, weight file names)."""
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ConvertError(f"{config_path}: missing (a Hugging Face model directory has config.json)")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConvertError(f"{config_path}: not valid JSON ({e})") from e
  if config.get("model_type") not in FAMILIES:
    raise ConvertError(f"{config_path}: model_type={config.get('model_type')!r}; expected one of "
                       f"{sorted(FAMILIES)} (BrainLM's released checkpoints)")
  files = []
  for name in WEIGHT_FILES:
    index = os.path.join(hf_dir, name + ".index.json")
    if os.path.isfile(os.path.join(hf_dir, name)):
      files = [name]
    elif os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        files = sorted(set(json.load(f).get("weight_map", {}).values()))
    if files:
      break
  if not files:
    raise ConvertError(f"{hf_dir}: no weights file ({' or '.join(WEIGHT_FILES)}, or a sharded "
                       "*.index.json)")
  state = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.isfile(path):
      raise ConvertError(f"{path}: listed in the index but missing")
    state.update({k: np.asarray(v, np.float32) for k, v in _load_weight_file(path).items()})
  return config, state, files


# ----------------------------------------------------------------------------------------------
# Configs.


def _need(hf: dict, key: str, where: str = "config.json"):
  if key not in hf:
    raise ConvertError(f"{where}: missing key {key!r} (model_type {hf.get('model_type')!r})")
  return hf[key]


def _check_gelu(hf: dict) -> None:
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ConvertError(f"config.json: hidden_act={hf['hidden_act']!r}; only 'gelu' is supported")


def model_config_from_hf(hf: dict, *, num_parcels: int | None = None, window: int | None = None,
                         value_scale: float | None = None,
                         pad_value: float | None = None) -> ModelConfig:
  """The ModelConfig (variant + sizes) that runs a checkpoint of `hf` (its config.json).

  num_parcels/window/value_scale/pad_value apply to 'vit_mae' (not in its config; default
  BrainLM's A424 x 200 windows, 5.6430855, -1); 'brainlm_mae' takes them from its config.
  """
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ConvertError(f"config.json: model_type={model_type!r}; expected one of "
                       f"{sorted(FAMILIES)} (BrainLM's released checkpoints)")
  _check_gelu(hf)
  common = dict(
      variant=FAMILIES[model_type], hidden_size=_need(hf, "hidden_size"),
      num_layers=_need(hf, "num_hidden_layers"), num_heads=_need(hf, "num_attention_heads"),
      mlp_dim=_need(hf, "intermediate_size"), decoder_hidden_size=_need(hf, "decoder_hidden_size"),
      decoder_num_layers=_need(hf, "decoder_num_hidden_layers"),
      decoder_num_heads=_need(hf, "decoder_num_attention_heads"),
      decoder_mlp_dim=_need(hf, "decoder_intermediate_size"),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), exact_gelu=True, spatial="xyz",
      dropout=0.0)
  if model_type == "brainlm_mae":
    if hf.get("use_tanh_decoder"):
      raise ConvertError("config.json: use_tanh_decoder=true is not supported")
    if hf.get("inv_coeff_init_option"):
      raise ConvertError("config.json: inv_coeff_init_option=true is not supported")
    if common["hidden_size"] != common["decoder_hidden_size"]:
      raise ConvertError(
          f"config.json: hidden_size={common['hidden_size']} != decoder_hidden_size="
          f"{common['decoder_hidden_size']}: BrainLM's decoder adds hidden_size-wide XYZ and "
          "time embeddings to its tokens, so the original cannot run this config either")
    return ModelConfig(
        num_parcels=_need(hf, "num_brain_voxels"), window=_need(hf, "num_timepoints_per_voxel"),
        patch_len=_need(hf, "timepoint_patching_size"), coord_scale=1.0,
        num_landmarks=int(hf.get("num_landmarks", 64)),
        segment_means_seq_len=int(hf.get("segment_means_seq_len", 64)),
        conv_kernel_size=int(hf.get("conv_kernel_size") or 0), **common)
  image_size, patch = _need(hf, "image_size"), _need(hf, "patch_size")
  image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
  patch = patch[0] if isinstance(patch, (list, tuple)) else patch
  d = dict(VITMAE_DEFAULTS)
  d.update({k: v for k, v in dict(num_parcels=num_parcels, window=window, value_scale=value_scale,
                                  pad_value=pad_value).items() if v is not None})
  if max(d["num_parcels"], d["window"]) > image_size:
    raise ConvertError(f"{d['num_parcels']} parcels x {d['window']} timepoints do not fit in the "
                       f"model's {image_size} x {image_size} image")
  return ModelConfig(
      num_parcels=int(d["num_parcels"]), window=int(d["window"]), patch_len=int(patch),
      image_size=int(image_size), image_channels=int(hf.get("num_channels", 3)),
      value_scale=float(d["value_scale"]), pad_value=float(d["pad_value"]), **common)


# ----------------------------------------------------------------------------------------------
# Tensor maps: our param path -> (candidate HF keys, transform). The first key present is used.

Transform = Callable[[np.ndarray], np.ndarray]
_ID: Transform = lambda w: w


def _linear(keys: list[str]) -> dict:
  return {"kernel": ([k + ".weight" for k in keys], lambda w: w.T),
          "bias": ([k + ".bias" for k in keys], _ID)}


def _heads_in(keys: list[str], heads: int) -> dict:  # Linear(D -> H*hd) -> [D, H, hd]
  return {"kernel": ([k + ".weight" for k in keys], lambda w: w.T.reshape(w.shape[1], heads, -1)),
          "bias": ([k + ".bias" for k in keys], lambda b: b.reshape(heads, -1))}


def _heads_out(keys: list[str], heads: int) -> dict:  # Linear(H*hd -> D) -> [H, hd, D]
  return {"kernel": ([k + ".weight" for k in keys], lambda w: w.T.reshape(heads, -1, w.shape[0])),
          "bias": ([k + ".bias" for k in keys], _ID)}


def _norm(keys: list[str]) -> dict:
  return {"scale": ([k + ".weight" for k in keys], _ID),
          "bias": ([k + ".bias" for k in keys], _ID)}


def _nystrom_layer(prefix: str, heads: int) -> dict:
  p = prefix
  return {
      "attention": {"query": _heads_in([p + "attention.self.query"], heads),
                    "key": _heads_in([p + "attention.self.key"], heads),
                    "value": _heads_in([p + "attention.self.value"], heads),
                    "out": _heads_out([p + "attention.output.dense"], heads),
                    "conv": ([p + "attention.self.conv.weight"], lambda w: w.reshape(heads, -1))},
      "ln_attention": _norm([p + "attention.output.LayerNorm"]),
      "mlp_in": _linear([p + "intermediate.dense"]),
      "mlp_out": _linear([p + "output.dense"]),
      "ln_mlp": _norm([p + "output.LayerNorm"])}


def _vit_layer(prefixes: list[str], heads: int) -> dict:
  def alt(old: str, new: str) -> list[str]:  # Transformers 4.x and 5.x names
    return [p + old for p in prefixes] + [p + new for p in prefixes]
  return {
      "attention": {"query": _heads_in(alt("attention.attention.query", "attention.q_proj"), heads),
                    "key": _heads_in(alt("attention.attention.key", "attention.k_proj"), heads),
                    "value": _heads_in(alt("attention.attention.value", "attention.v_proj"), heads),
                    "out": _heads_out(alt("attention.output.dense", "attention.o_proj"), heads)},
      "ln_attention": _norm(alt("layernorm_before", "layernorm_before")),
      "mlp_in": _linear(alt("intermediate.dense", "mlp.fc1")),
      "mlp_out": _linear(alt("output.dense", "mlp.fc2")),
      "ln_mlp": _norm(alt("layernorm_after", "layernorm_after"))}


def _patch_conv(w: np.ndarray) -> np.ndarray:  # Conv2d [D, C, p, p] -> [(row, col, chan), D]
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _tensor_map(cfg: ModelConfig) -> tuple[dict, dict[str, str]]:
  """(nested map like the params, {HF key: why it is not a parameter})."""
  if cfg.variant == "brainlm_nystrom":
    m = {"patch_embed": _linear(["vit.embeddings.signal_embedding_projection"]),
         "spatial": {"xyz": _linear(["vit.embeddings.xyz_embedding_projection"])},
         "cls": (["vit.embeddings.cls_token"], _ID),
         "encoder": {f"layer_{i}": _nystrom_layer(f"vit.encoder.layer.{i}.", cfg.num_heads)
                     for i in range(cfg.num_layers)},
         "decoder_embed": _linear(["decoder.decoder_embed"]),
         "decoder_spatial": {"xyz": _linear(["decoder.decoder_xyz_projection"])},
         "mask_token": (["decoder.mask_token"], _ID),
         "decoder": {f"layer_{i}": _nystrom_layer(f"decoder.decoder_layers.{i}.",
                                                  cfg.decoder_num_heads)
                     for i in range(cfg.decoder_num_layers)},
         "head_hidden": _linear(["decoder.decoder_pred1"]),
         "head_out": _linear(["decoder.decoder_pred2"])}
    m["encoder"]["ln_final"] = _norm(["vit.layernorm"])
    m["decoder"]["ln_final"] = _norm(["decoder.decoder_norm"])
    unused = {"decoder.decoder_pred.weight": "ViTMAEDecoder's pixel head, unused by BrainLM",
              "decoder.decoder_pred.bias": "ViTMAEDecoder's pixel head, unused by BrainLM",
              "vit.embeddings.pos_embedding.pe": "fixed sinusoid buffer (checked, recomputed)",
              "decoder.pos_embedding.pe": "fixed sinusoid buffer (checked, recomputed)"}
    return m, unused
  m = {"patch_embed": {"kernel": (["vit.embeddings.patch_embeddings.projection.weight"],
                                  _patch_conv),
                       "bias": (["vit.embeddings.patch_embeddings.projection.bias"], _ID)},
       "pos_embed": (["vit.embeddings.position_embeddings"], lambda w: w.reshape(w.shape[-2:])),
       "cls": (["vit.embeddings.cls_token"], _ID),
       "encoder": {f"layer_{i}": _vit_layer([f"vit.encoder.layer.{i}.", f"vit.layers.{i}."],
                                            cfg.num_heads) for i in range(cfg.num_layers)},
       "decoder_embed": _linear(["decoder.decoder_embed"]),
       "decoder_pos_embed": (["decoder.decoder_pos_embed"], lambda w: w.reshape(w.shape[-2:])),
       "mask_token": (["decoder.mask_token"], _ID),
       "decoder": {f"layer_{i}": _vit_layer([f"decoder.decoder_layers.{i}.",
                                             f"decoder.decoder_encoder.layer.{i}."],
                                            cfg.decoder_num_heads)
                   for i in range(cfg.decoder_num_layers)},
       "decoder_pred": _linear(["decoder.decoder_pred"])}
  m["encoder"]["ln_final"] = _norm(["vit.layernorm"])
  m["decoder"]["ln_final"] = _norm(["decoder.decoder_norm"])
  return m, {}


def _check_sinusoid_buffers(cfg: ModelConfig, state: dict) -> list[str]:
  """BrainLM's fixed time-encoding buffers must equal model.sinusoid_table (what we compute)."""
  checked = []
  for key, dim in (("vit.embeddings.pos_embedding.pe", cfg.hidden_size),
                   ("decoder.pos_embedding.pe", cfg.decoder_hidden_size)):
    if key in state:
      pe = state[key].reshape(-1, state[key].shape[-1])
      n = min(len(pe), cfg.num_patches)
      want = sinusoid_table(n, dim)
      if pe.shape[-1] != dim or not np.allclose(pe[:n], want, atol=1e-4):
        raise ConvertError(f"{key}: the time-encoding buffer differs from the sinusoid this "
                           "variant computes (shape or values); cannot convert faithfully")
      checked.append(key)
  return checked


def convert_params(cfg: ModelConfig, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """Maps a HF state dict onto the params of `cfg`'s variant.

  Returns (params as nested dict of float32 arrays, report) where report has 'mapped'
  {our path: HF key}, 'zero_filled' (absent qkv biases of qkv_bias=false ViTMAEs),
  'checked_buffers', 'unused' {HF key: reason}. Raises ConvertError on a missing tensor or a
  shape mismatch (all of them listed).
  """
  expected = traverse_util.flatten_dict(abstract_params(cfg), sep="/")
  tmap, known_unused = _tensor_map(cfg)
  flat_map = traverse_util.flatten_dict(
      tmap, sep="/", is_leaf=lambda _, v: isinstance(v, tuple))
  params, mapped, zero_filled, problems = {}, {}, [], []
  for path, spec in sorted(expected.items()):
    if path not in flat_map:
      problems.append(f"{path}: no HF tensor is mapped to it (converter bug)")
      continue
    keys, fn = flat_map[path]
    key = next((k for k in keys if k in state), None)
    if key is None:
      if path.endswith("/bias") and "/attention/" in path and path.split("/")[-2] in (
          "query", "key", "value"):
        params[path] = np.zeros(spec.shape, np.float32)
        zero_filled.append(path)
        continue
      problems.append(f"{path}: missing from the checkpoint (looked for {' or '.join(keys)})")
      continue
    try:
      value = np.asarray(fn(state[key]), np.float32)
    except ValueError as e:
      problems.append(f"{key}: shape {state[key].shape} cannot map to {path}: {e}")
      continue
    if value.shape != tuple(spec.shape):
      problems.append(f"{key}: shape {state[key].shape} -> {value.shape}, but {path} needs "
                      f"{tuple(spec.shape)}")
      continue
    params[path], mapped[path] = value, key
  if problems:
    raise ConvertError(f"{len(problems)} tensor(s) do not fit a {cfg.variant} model of this "
                       "config:\n  " + "\n  ".join(problems))
  checked = _check_sinusoid_buffers(cfg, state)
  used = set(mapped.values()) | set(checked)
  unused = {k: known_unused.get(k, "not used by the network") for k in sorted(state)
            if k not in used}
  unused.update({k: known_unused[k] for k in checked})
  report = {"mapped": mapped, "zero_filled": zero_filled, "checked_buffers": checked,
            "unused": dict(sorted(unused.items()))}
  return traverse_util.unflatten_dict(params, sep="/"), report


# ----------------------------------------------------------------------------------------------
# The whole job.


def _identity_scaler(num_parcels: int) -> RobustScaler:
  return RobustScaler(np.zeros(num_parcels), np.ones(num_parcels), center_recordings=False)


def fit_scaler(data: str, cfg: ModelConfig) -> RobustScaler:
  """BrainLM's scaling fitted on `data`: per-parcel (x - median) / IQR over all timepoints of all
  recordings, without per-recording centring."""
  recs, skipped = datasets.load_recordings(data, window=cfg.window, num_parcels=cfg.num_parcels)
  if not recs:
    reasons = "; ".join(f"{s.get('path')}: {s.get('reason')}" for s in skipped[:3])
    raise ConvertError(f"{data}: no usable recordings of {cfg.num_parcels} parcels and >= "
                       f"{cfg.window} timepoints ({len(skipped)} skipped: {reasons})")
  logging.info("Fitted the robust scaling on %d recordings (%d skipped)", len(recs), len(skipped))
  return RobustScaler().fit(recs, center_recordings=False)


def convert(hf_dir: str, out: str, *, coords: np.ndarray, coords_path: str = "",
            scaler_data: str | None = None,
            vitmae_overrides: dict | None = None) -> dict[str, Any]:
  """Converts a HF BrainLM directory into OUT/checkpoints/0/{state, meta}.

  Args:
    hf_dir: config.json + model.safetensors | pytorch_model.bin.
    out: output workdir (what `brainlm-probe --checkpoint` takes).
    coords: float32 [P, 3] parcel coordinates in the model's parcel order (A424: MNI mm).
    coords_path: where they came from (recorded in the meta).
    scaler_data: recordings to fit the per-parcel scaling on (`fit_scaler`), also stored as
      the config's data.path (brainlm-probe's default --data). Default: an identity scaling
      (the recordings given to the model are already scaled as in BrainLM's training).
    vitmae_overrides: num_parcels / window / value_scale / pad_value for 'vit_mae'.

  Returns the report (also written to OUT/convert_report.json).
  """
  hf, state, files = read_hf_dir(hf_dir)
  cfg = model_config_from_hf(hf, **(vitmae_overrides or {}))
  coords = np.asarray(coords, np.float32)
  if coords.shape != (cfg.num_parcels, 3):
    raise ConvertError(f"{coords_path or 'coords'}: {coords.shape[0]} coordinates, but the model "
                       f"has {cfg.num_parcels} parcels")
  params, report = convert_params(cfg, state)
  scaler = fit_scaler(scaler_data, cfg) if scaler_data else _identity_scaler(cfg.num_parcels)
  model_dict = dataclasses.asdict(cfg)
  # BrainLM masks tokens uniformly at random (its ViT-MAE `random_masking`) at the HF mask_ratio.
  masking = {"mode": "uniform", "ratio": float(hf.get("mask_ratio", 0.75)), "forecast_patches": 1}
  meta = {"config": {"model": model_dict, "masking": masking,
                     "data": {"path": scaler_data, "coords": coords_path, "window": cfg.window},
                     "source": {"hf_dir": os.path.abspath(hf_dir), "model_type": hf["model_type"],
                                "weights": files}},
          "model": model_dict, "data": {"seed": 0, "next_step": 0}, "scaler": scaler.to_dict(),
          "coords": coords.tolist(), "subjects": {}}
  state_tree = TrainState(step=jnp.asarray(0, jnp.int32),
                                params=jax.tree_util.tree_map(jnp.asarray, params),
                                opt_state={}, rng=jax.random.PRNGKey(0))
  ck = ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), async_save=False, keep=1)
  try:
    if not ck.save(0, state_tree, meta, force=True):
      raise ConvertError(f"{hf_dir}: the weights hold NaN/inf; nothing written")
  finally:
    ck.close()
  n_params = int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params)))
  report = {"hf_dir": os.path.abspath(hf_dir), "model_type": hf["model_type"],
            "variant": cfg.variant, "weights": files, "num_params": n_params,
            "num_hf_tensors": len(state), "num_mapped": len(report["mapped"]),
            "token_grid": list(token_grid(cfg)), "checkpoint": os.path.join(
                os.path.abspath(out), "checkpoints", "0"), **report}
  with open(os.path.join(out, "convert_report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
  return report
