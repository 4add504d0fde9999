"""What fine-tuning trains: the encoder with a head, layer-wise learning rates, the step.

  EncoderHead(cfg, num_outputs, ...)               signal -> encoder -> pooling -> MLP head
  layer_scales(params, num_layers, decay, spec)    per-leaf lr scale and trainable mask
  make_optimizer(config.train, params, layers)     frozen mask -> clip + AdamW -> per-layer lr
  supervised_step(state, batch, coords, ...)       one classification / regression update
                                                   (+ aux_weight x the masked-reconstruction loss)

Params of EncoderHead are {'brainlm': exactly the network's `encode` params (with the decoder's
too when `with_decoder`: BrainLM's auxiliary reconstruction term), so the pretrained tree maps
1:1, 'head_hidden', 'head_out'}. Pooling: the CLS token, the mean of the other tokens, or
`patches-fc` (the parcel x parcel correlation of the encoder's patch tokens,
`connectivity.patch_correlation`, Fisher z, upper triangle, scaled by 1/sqrt(pairs): the
reading that does best frozen).
Layer-wise lr decay (BEiT/ViT style): block i of L gets decay^(L - i), the embeddings
decay^(L + 1), the final LayerNorm, decoder and head 1; scanned (stacked) blocks get a per-layer
scale along axis 0. `train.trainable` (TRAINABLE) freezes the rest: their gradients are zeroed
before clipping and their updates, weight decay included, are zeroed, so they stay bit-identical.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from brainlm_jax.models import build_model, token_grid
from brainlm_jax.models import connectivity
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import state as state_lib
from brainlm_jax.training.state import TrainState
from brainlm_jax.training import steps
from brainlm_jax.training.steps import apply_gradients

EMBEDDINGS = ("patch_embed", "spatial", "cls")
POOLINGS = ("cls", "mean", "patches-fc")
# train.trainable: what fine-tuning updates (the head, final LayerNorm and decoder always).
TRAINABLE = ("all", "head", "top:K", "bottom:K")


def parse_trainable(spec: str | int, num_layers: int | None = None) -> tuple[str, int]:
  """'all' | 'head' | 'top:K' (the last K encoder blocks) | 'bottom:K' (the embeddings and the
  first K blocks) -> (kind, K); an int k >= 0 means 'top:k', < 0 'all'."""
  if isinstance(spec, (int, np.integer)):
    return ("all", 0) if spec < 0 else ("top", int(spec))
  kind, _, k = str(spec).partition(":")
  ok = (kind in ("all", "head") and not k) or (kind in ("top", "bottom") and k.isdigit())
  if ok and num_layers is not None and k and int(k) > num_layers:
    ok = False
  if not ok:
    raise ValueError(f"train.trainable={spec!r}; expected one of {', '.join(TRAINABLE)} "
                     f"(K from 0 to the encoder's {num_layers or 'L'} blocks)")
  return kind, int(k or 0)


class EncoderHead(nn.Module):
  """signal [B, P, W] -> outputs float32 [B, num_outputs]: BrainLM encoder, pooling (POOLINGS),
  MLP head (LayerNorm-free: the encoder ends in one). live [B, P] (0: a dead parcel, left out of
  patches-fc). frozen_encoder: no gradient flows into the encoder (a linear probe trained by
  SGD, at the cost of the forward pass only). with_decoder: init creates the decoder's params
  too (for the auxiliary reconstruction loss; the outputs do not use it)."""
  cfg: ModelConfig
  num_outputs: int
  head_hidden: int = 0
  pooling: str = "cls"
  head_dropout: float = 0.0
  frozen_encoder: bool = False
  with_decoder: bool = False

  @nn.compact
  def __call__(self, signal, coords, masking, *, train: bool = False, live=None):
    net = build_model(self.cfg, name="brainlm")
    latent = net.encode(signal, coords, masking, train=train)
    if self.with_decoder and self.is_initializing():
      net(signal, coords, masking, train=False)
    if self.frozen_encoder:
      latent = jax.lax.stop_gradient(latent)
    if self.pooling not in POOLINGS:
      raise ValueError(f"task.pooling={self.pooling!r}; expected one of {POOLINGS}")
    if self.pooling == "patches-fc":
      b, (p, t) = latent.shape[0], token_grid(self.cfg)
      corr = connectivity.patch_correlation(latent[:, 1:].reshape(b, p, t, -1), live)
      iu = np.triu_indices(p, k=1)
      # Fisher z, scaled by 1/sqrt(pairs): an Adam step (the same size for every weight) then
      # moves the outputs about as much as it does on a pooled token, not sqrt(pairs) times more.
      x = jnp.arctanh(jnp.clip(corr[:, iu[0], iu[1]], -1 + 1e-6, 1 - 1e-6)) / np.sqrt(len(iu[0]))
    elif self.pooling == "cls":
      x = latent[:, 0].astype(jnp.float32)
    else:
      x = latent[:, 1:].mean(axis=1).astype(jnp.float32)
    if self.head_hidden:
      x = nn.gelu(nn.Dense(self.head_hidden, name="head_hidden")(x))
      x = nn.Dropout(self.head_dropout)(x, deterministic=not train)
    return nn.Dense(self.num_outputs, name="head_out")(x)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def layer_scales(params: Any, num_layers: int, decay: float,
                 trainable: str | int = "all") -> tuple[Any, Any]:
  """(lr scale, trainable 0/1) per leaf, float32 arrays broadcastable to the leaf.

  Depth: embeddings (patch_embed, spatial, cls) 0, encoder block i i + 1, everything else (final
  LayerNorm, head, decoder) L + 1; scale = decay^(L + 1 - depth); trainable (`parse_trainable`):
  all; head: depth L + 1; top:K: depth > L - K; bottom:K: depth <= K or L + 1.
  """
  big = num_layers + 1
  kind, k = parse_trainable(trainable, num_layers)

  def depth_of(path, leaf):
    names = _path_names(path)
    names = names[1:] if names[0] == "brainlm" else names
    if names[0] in EMBEDDINGS:
      return np.zeros((), np.float32)
    if names[0] == "encoder" and names[1].startswith("layer_"):
      return np.asarray(int(names[1][len("layer_"):]) + 1, np.float32)
    if names[0] == "encoder" and names[1] == "layers":  # scanned: stacked on axis 0
      return np.arange(1, num_layers + 1, dtype=np.float32).reshape(
          (num_layers,) + (1,) * (np.ndim(leaf) - 1))
    return np.asarray(big, np.float32)

  depth = jax.tree_util.tree_map_with_path(depth_of, params)
  scale = jax.tree_util.tree_map(lambda d: np.float32(decay) ** (big - d), depth)
  rule = {"all": lambda d: d >= 0, "head": lambda d: d == big,
          "top": lambda d: d > num_layers - k, "bottom": lambda d: (d <= k) | (d == big)}[kind]
  train = jax.tree_util.tree_map(lambda d: rule(d).astype(np.float32), depth)
  return scale, train


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching (broadcastable) leaf of `scales`."""
  def update(updates, state, params=None):  # pylint: disable=unused-argument
    return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(t: ml_collections.ConfigDict, abstract_params: Any,
                   num_layers: int) -> optax.GradientTransformation:
  """Frozen-gradient mask -> train.make_optimizer (clip, AdamW, warmup-cosine) -> per-layer lr."""
  scale, trainable = layer_scales(abstract_params, num_layers, t.layer_decay, t.trainable)
  both = jax.tree_util.tree_map(lambda s, m: s * m, scale, trainable)
  return optax.chain(scale_by_tree(trainable), state_lib.make_optimizer(t), scale_by_tree(both))


def task_loss(out: jax.Array, label: jax.Array, kind: str) -> jax.Array:
  """Cross-entropy on logits [B, C] with int labels, or MSE of out[:, 0] against targets."""
  if kind == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(out, label.astype(jnp.int32)).mean()
  return jnp.mean(jnp.square(out[:, 0] - label.astype(jnp.float32)))


def supervised_step(state: TrainState, batch: dict, coords, *, model: nn.Module,
                    tx: optax.GradientTransformation, kind: str, aux_weight: float = 0.0,
                    mask_cfg: Any = None):
  """One update on {'signal': [B, P, W], 'label': [B], 'live': [B, P]}; with aux_weight, plus
  that times the masked-reconstruction loss of the same windows under `mask_cfg` (the
  pretraining run's masking: BrainLM's fine-tuning variant). A NaN/inf step leaves the state as
  is."""
  rng, aux_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  cfg = model.cfg
  masking = masking_lib.no_masking(batch["signal"].shape[0], *token_grid(cfg))
  live = batch.get("live")

  def loss_fn(params):
    out = model.apply({"params": params}, batch["signal"], coords, masking, train=True,
                      live=live, rngs={"dropout": rng})
    loss = task_loss(out, batch["label"], kind)
    if aux_weight:
      mae, _ = steps.forward_loss(params["brainlm"], batch["signal"], coords, aux_rng,
                                  model=build_model(cfg), mask_cfg=mask_cfg, loss_kind="mse",
                                  train=True, live=live)
      loss = loss + aux_weight * mae
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return apply_gradients(state, loss, grads, tx)


def count_trainable(trainable: Any, params: Any) -> int:
  return int(sum(np.sum(np.broadcast_to(m, np.shape(p)))
                 for m, p in zip(jax.tree_util.tree_leaves(trainable),
                                 jax.tree_util.tree_leaves(params))))


def predict_fn(model: nn.Module):
  """(params, signal [B, P, W], coords, live [B, P]) -> the head's outputs [B, num_outputs],
  every token visible, no dropout (jit it, e.g. with `functions.on_mesh`)."""
  cfg = model.cfg

  def fn(params, signal, coords, live):
    masking = masking_lib.no_masking(signal.shape[0], *token_grid(cfg))
    return model.apply({"params": params}, signal, coords, masking, train=False, live=live)
  return fn
