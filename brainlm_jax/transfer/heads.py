"""What fine-tuning trains: the encoder with a head, layer-wise learning rates, the step.

  EncoderHead(cfg, num_outputs, ...)               signal -> encoder -> CLS / mean -> MLP head
  layer_scales(params, num_layers, decay, k)       per-leaf lr scale and trainable mask
  make_optimizer(config.train, params, layers)     frozen mask -> clip + AdamW -> per-layer lr
  supervised_step(state, batch, coords, ...)       one classification / regression update

Params of EncoderHead are {'brainlm': exactly the network's `encode` params (so the pretrained
tree maps 1:1), 'head_hidden', 'head_out'}. Layer-wise lr decay (BEiT/ViT style): block i of L
gets decay^(L - i), the embeddings decay^(L + 1), the final LayerNorm and head 1; scanned
(stacked) blocks get a per-layer scale along axis 0. `train.trainable_layers = k >= 0` freezes
the embeddings and all but the last k blocks (their gradients are zeroed before clipping and
their updates, weight decay included, are zeroed).
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
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import state as state_lib
from brainlm_jax.training.state import TrainState
from brainlm_jax.training.steps import apply_gradients

EMBEDDINGS = ("patch_embed", "spatial", "cls")


class EncoderHead(nn.Module):
  """signal [B, P, W] -> outputs float32 [B, num_outputs]: BrainLM encoder, CLS or mean token,
  MLP head (LayerNorm-free: the encoder ends in one)."""
  cfg: ModelConfig
  num_outputs: int
  head_hidden: int = 0
  pooling: str = "cls"
  head_dropout: float = 0.0

  @nn.compact
  def __call__(self, signal, coords, masking, *, train: bool = False):
    latent = build_model(self.cfg, name="brainlm").encode(signal, coords, masking, train=train)
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"task.pooling={self.pooling!r}; expected 'cls' or 'mean'")
    x = (latent[:, 0] if self.pooling == "cls" else latent[:, 1:].mean(axis=1)).astype(jnp.float32)
    if self.head_hidden:
      x = nn.gelu(nn.Dense(self.head_hidden, name="head_hidden")(x))
      x = nn.Dropout(self.head_dropout)(x, deterministic=not train)
    return nn.Dense(self.num_outputs, name="head_out")(x)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def layer_scales(params: Any, num_layers: int, decay: float,
                 trainable_layers: int = -1) -> tuple[Any, Any]:
  """(lr scale, trainable 0/1) per leaf, float32 arrays broadcastable to the leaf.

  Depth: embeddings (patch_embed, spatial, cls) 0, encoder block i i + 1, everything else (final
  LayerNorm, head, decoder) L + 1; scale = decay^(L + 1 - depth); trainable when
  trainable_layers < 0 or depth > L - trainable_layers.
  """
  big = num_layers + 1

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
  train = jax.tree_util.tree_map(
      lambda d: ((d > num_layers - trainable_layers) | (trainable_layers < 0)).astype(np.float32),
      depth)
  return scale, train


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching (broadcastable) leaf of `scales`."""
  def update(updates, state, params=None):  # pylint: disable=unused-argument
    return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(t: ml_collections.ConfigDict, abstract_params: Any,
                   num_layers: int) -> optax.GradientTransformation:
  """Frozen-gradient mask -> train.make_optimizer (clip, AdamW, warmup-cosine) -> per-layer lr."""
  scale, trainable = layer_scales(abstract_params, num_layers, t.layer_decay, t.trainable_layers)
  both = jax.tree_util.tree_map(lambda s, m: s * m, scale, trainable)
  return optax.chain(scale_by_tree(trainable), state_lib.make_optimizer(t), scale_by_tree(both))


def task_loss(out: jax.Array, label: jax.Array, kind: str) -> jax.Array:
  """Cross-entropy on logits [B, C] with int labels, or MSE of out[:, 0] against targets."""
  if kind == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(out, label.astype(jnp.int32)).mean()
  return jnp.mean(jnp.square(out[:, 0] - label.astype(jnp.float32)))


def supervised_step(state: TrainState, batch: dict, coords, *, model: nn.Module,
                    tx: optax.GradientTransformation, kind: str):
  """One update on {'signal': [B, P, W], 'label': [B]}; a NaN/inf step leaves the state as is."""
  rng = jax.random.fold_in(state.rng, state.step)
  cfg = model.cfg
  masking = masking_lib.no_masking(batch["signal"].shape[0], *token_grid(cfg))

  def loss_fn(params):
    out = model.apply({"params": params}, batch["signal"], coords, masking, train=True,
                      rngs={"dropout": rng})
    return task_loss(out, batch["label"], kind)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return apply_gradients(state, loss, grads, tx)


def count_trainable(trainable: Any, params: Any) -> int:
  return int(sum(np.sum(np.broadcast_to(m, np.shape(p)))
                 for m, p in zip(jax.tree_util.tree_leaves(trainable),
                                 jax.tree_util.tree_leaves(params))))


def predict_fn(model: nn.Module):
  """(params, signal [B, P, W], coords) -> the head's outputs [B, num_outputs], every token
  visible, no dropout (jit it, e.g. with `functions.on_mesh`)."""
  cfg = model.cfg

  def fn(params, signal, coords):
    masking = masking_lib.no_masking(signal.shape[0], *token_grid(cfg))
    return model.apply({"params": params}, signal, coords, masking, train=False)
  return fn
