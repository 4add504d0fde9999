"""A PyTorch reference of BrainLM's `brainlm_mae` forward (tests only).

Rebuilt from the released model's description (vandijklab/BrainLM brainlm_mae/modeling_brainlm.py)
with Hugging Face's own `NystromformerLayer`, and with the same module names, so its state dict
has the released checkpoints' key names (vit.embeddings.*, vit.encoder.layer.N.*, vit.layernorm.*,
decoder.*, including the unused decoder.decoder_pred of ViTMAEDecoder and the `pe` buffers).
"""

import json
import math
import os

import torch
from torch import nn
from transformers import NystromformerConfig
from transformers.models.nystromformer.modeling_nystromformer import NystromformerLayer


def brainlm_config(**overrides) -> dict:
  """A small config.json of model_type brainlm_mae (the released one's keys)."""
  cfg = {"model_type": "brainlm_mae", "architectures": ["BrainLMForPretraining"],
         "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-12,
         "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
         "decoder_num_attention_heads": 2, "decoder_intermediate_size": 48,
         "num_brain_voxels": 12, "num_timepoints_per_voxel": 40, "timepoint_patching_size": 10,
         "mask_ratio": 0.5, "num_landmarks": 64, "segment_means_seq_len": 64,
         "conv_kernel_size": 5, "inv_coeff_init_option": False, "use_tanh_decoder": False,
         "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
         "loss_fn": "mse", "initializer_range": 0.02}
  cfg.update(overrides)
  return cfg


class PositionalEncoding(nn.Module):
  def __init__(self, d_model: int, max_len: int = 5000):
    super().__init__()
    div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pos = torch.arange(max_len).unsqueeze(1)
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    self.register_buffer("pe", pe)

  def forward(self, x):  # [B, P, T, D]
    return x + self.pe[: x.size(2)][None, None]


def _layer_config(c: dict, decoder: bool) -> NystromformerConfig:
  pre = "decoder_" if decoder else ""
  return NystromformerConfig(
      hidden_size=c[f"{pre}hidden_size"],
      num_attention_heads=c[f"{pre}num_attention_heads"],
      intermediate_size=c[f"{pre}intermediate_size"], hidden_act=c["hidden_act"],
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      layer_norm_eps=c["layer_norm_eps"], num_landmarks=c["num_landmarks"],
      segment_means_seq_len=c["segment_means_seq_len"], conv_kernel_size=c["conv_kernel_size"],
      inv_coeff_init_option=c["inv_coeff_init_option"])


class _Embeddings(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.cls_token = nn.Parameter(torch.randn(1, 1, c["hidden_size"]) * 0.02)
    self.signal_embedding_projection = nn.Linear(c["timepoint_patching_size"], c["hidden_size"])
    self.xyz_embedding_projection = nn.Linear(3, c["hidden_size"])
    self.pos_embedding = PositionalEncoding(c["hidden_size"])


class _Encoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.layer = nn.ModuleList(NystromformerLayer(_layer_config(c, False))
                               for _ in range(c["num_hidden_layers"]))


class _ViT(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.embeddings = _Embeddings(c)
    self.encoder = _Encoder(c)
    self.layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])


class _Decoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    e = c["decoder_hidden_size"]
    self.decoder_embed = nn.Linear(c["hidden_size"], e)
    self.mask_token = nn.Parameter(torch.randn(1, 1, e) * 0.02)
    self.decoder_layers = nn.ModuleList(NystromformerLayer(_layer_config(c, True))
                                        for _ in range(c["decoder_num_hidden_layers"]))
    self.decoder_norm = nn.LayerNorm(e, eps=c["layer_norm_eps"])
    self.decoder_pred = nn.Linear(e, c["patch_size"] ** 2 * c["num_channels"])  # unused
    self.decoder_xyz_projection = nn.Linear(3, c["hidden_size"])
    self.pos_embedding = PositionalEncoding(c["hidden_size"])
    self.decoder_pred1 = nn.Linear(e, e // 2)
    self.decoder_pred2 = nn.Linear(e // 2, c["timepoint_patching_size"])


class BrainLMReference(nn.Module):
  """forward(signal [B, P, W], xyz [B, P, 3], noise [B, P*T]) -> (pred [B, P, T, L],
  latent [B, 1 + K, D], mask [B, P*T]); BrainLM's uniform shuffle masking by `noise`."""

  def __init__(self, c: dict):
    super().__init__()
    self.c = c
    self.vit = _ViT(c)
    self.decoder = _Decoder(c)

  def forward(self, signal, xyz, noise):
    c, emb = self.c, self.vit.embeddings
    b, p, w = signal.shape
    t = w // c["timepoint_patching_size"]
    x = emb.signal_embedding_projection(signal.reshape(b, p, t, -1))
    x = x + emb.xyz_embedding_projection(xyz)[:, :, None]
    x = emb.pos_embedding(x).flatten(1, 2)
    n, d = x.shape[1:]
    keep = int(n * (1 - c["mask_ratio"]))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    h = torch.cat([emb.cls_token.expand(b, -1, -1), x], dim=1)
    for layer in self.vit.encoder.layer:
      h = layer(h)[0]
    latent = self.vit.layernorm(h)

    dec = self.decoder
    x = dec.decoder_embed(latent)
    e = x.shape[-1]
    x_ = torch.cat([x[:, 1:], dec.mask_token.repeat(b, n - keep, 1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, e)).reshape(b, p, t, e)
    x_ = x_ + dec.decoder_xyz_projection(xyz)[:, :, None]
    x_ = dec.pos_embedding(x_).flatten(1, 2)
    h = torch.cat([x[:, :1], x_], dim=1)
    for layer in dec.decoder_layers:
      h = layer(h)[0]
    h = dec.decoder_norm(h)
    out = dec.decoder_pred2(nn.functional.leaky_relu(dec.decoder_pred1(h), 0.1))[:, 1:]
    return out.reshape(b, p, t, -1), latent, mask


def save_hf_dir(model: BrainLMReference, path: str, *, safetensors: bool = True) -> str:
  """Writes config.json + model.safetensors (or pytorch_model.bin), like save_pretrained."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(model.c, f, indent=1)
  sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  if safetensors:
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, os.path.join(path, "model.safetensors"))
  else:
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
  return path
