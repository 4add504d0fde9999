"""The pure train / eval steps, their one update tail, and their jit-ted, sharded forms.

  apply_gradients(state, loss, grads, tx) -> (state, metrics)   clip + AdamW (tx), skip NaN/inf
  train_step(state, batch, coords, ...) -> (state, metrics)     masked-autoencoder update
  eval_step(params, batch, coords, rng, ...) -> masked sums      masked reconstruction statistics
  make_train_step / make_eval_step(...)                          jax.jit with in/out shardings
  evaluate(eval_fn, params, batches, coords, mesh, seed)         masked MSE / R² over fixed windows

The batch is `{'signal': [B, P, W] float32}` sharded over data x fsdp. Masks are drawn in the
input pipeline (`masking.in_pipeline`: the batch then also holds 'ids_keep' and 'mask') or, if
not, inside the step from `fold_in(state.rng, state.step)`; either way a run is a pure function
of (config, data, step): resuming at step s reproduces the uninterrupted run bit for bit on the
same mesh. Every step is traced inside `sharding.use_mesh`, so the model's activation
constraints apply.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from brainlm_jax.data.windows import WindowBatch
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import masked_loss
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.training import sharding
from brainlm_jax.training.state import TrainState


def apply_gradients(state: TrainState, loss: jax.Array, grads: Any,
                    tx: optax.GradientTransformation, *,
                    skip_nonfinite: bool = True) -> tuple[TrainState, dict]:
  """The update tail every step shares: `tx` (clip, AdamW, ...) applied to `grads`; with
  `skip_nonfinite`, a NaN/inf loss or gradient leaves params and optimizer state untouched.
  Returns (state at step + 1, {'train_loss', 'grad_norm', 'nonfinite'})."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"train_loss": loss, "grad_norm": grad_norm,
                     "nonfinite": 1.0 - finite.astype(jnp.float32)}


def forward_loss(params, signal, coords, rng, *, model, mask_cfg, loss_kind, train,
                 masking: masking_lib.Masking | None = None, live=None):
  """Masked-reconstruction loss of one batch -> (loss, (pred, target, masking)); live [B, P]:
  0 for the constant (dead) parcels of a window's recording, left out of the loss."""
  mcfg = model.cfg
  mask_rng, drop_rng = jax.random.split(rng)
  b = signal.shape[0]
  if masking is None:  # not drawn by the input pipeline: draw it here from the step's key
    masking = masking_lib.make_masking(mask_rng, b, mcfg.num_parcels, mcfg.num_patches,
                                       mode=mask_cfg.mode, ratio=mask_cfg.ratio,
                                       forecast_patches=mask_cfg.forecast_patches)
  pred, _ = model.apply({"params": params}, signal, coords, masking, train=train,
                        rngs={"dropout": drop_rng} if train else None)
  target = signal.reshape(pred.shape)
  return masked_loss(pred, target, masking.mask, loss_kind, live), (pred, target, masking)


def train_step(state: TrainState, batch: dict, coords: jax.Array | None, *, model,
               tx: optax.GradientTransformation, mask_cfg, loss_kind: str, accum_steps: int,
               skip_nonfinite: bool = True) -> tuple[TrainState, dict]:
  """One optimizer update on a global batch (optionally accumulated over micro-batches).

  batch: {'signal': [B, P, W]}, optionally 'live' [B, P] (0: a dead parcel, out of the loss)
  and, when the input pipeline draws the masks, 'ids_keep' [B, visible] and 'mask' [B, P, N];
  otherwise masks come from fold_in(state.rng, step).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_and_grad(params, b, key):
    fn = functools.partial(forward_loss, model=model, mask_cfg=mask_cfg, loss_kind=loss_kind,
                           train=True)
    masking = (masking_lib.Masking(ids_keep=b["ids_keep"], mask=b["mask"])
               if "ids_keep" in b else None)
    (loss, _), grads = jax.value_and_grad(fn, has_aux=True)(params, b["signal"], coords, key,
                                                             masking=masking, live=b.get("live"))
    return loss, grads

  if accum_steps == 1:
    loss, grads = loss_and_grad(state.params, batch, rng)
  else:
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)
    keys = jax.random.split(rng, accum_steps)

    def body(carry, xs):
      loss_sum, grad_sum = carry
      loss, grads = loss_and_grad(state.params, *xs)
      return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (micro, keys))
    loss = loss / accum_steps
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
  return apply_gradients(state, loss, grads, tx, skip_nonfinite=skip_nonfinite)


def eval_step(params, batch: dict, coords, rng, *, model, mask_cfg, loss_kind: str):
  """Masked-reconstruction sufficient statistics on one batch (sums; see metrics.reduce_sums)."""
  _, (pred, target, masking) = forward_loss(params, batch["signal"], coords, rng, model=model,
                                            mask_cfg=mask_cfg, loss_kind=loss_kind, train=False)
  return metrics_lib.masked_sums(pred, target, masking.mask, batch.get("weight"),
                                 live=batch.get("live"))


def make_train_step(model, tx, config, mesh, state_shardings):
  """jax.jit of `train_step` for `config` (masking, loss, accumulation), donating the state.
  Call (and so trace) it inside `sharding.use_mesh(mesh)`."""
  step = functools.partial(train_step, model=model, tx=tx, mask_cfg=config.masking,
                           loss_kind=config.train.loss, accum_steps=config.train.grad_accum_steps)
  batch_shardings = sharding.batch_sharding(mesh, 1)  # every batch leaf: leading axis split
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model, config, mesh, param_shardings):
  """jax.jit of `eval_step`; call it inside `sharding.use_mesh(mesh)`."""
  step = functools.partial(eval_step, model=model, mask_cfg=config.masking,
                           loss_kind=config.train.loss)
  batch_shardings = {"signal": sharding.batch_sharding(mesh, 3),
                     "weight": sharding.batch_sharding(mesh, 1),
                     "live": sharding.batch_sharding(mesh, 2)}
  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(param_shardings, batch_shardings, rep, rep),
                 out_shardings=rep)


def evaluate(eval_fn, params, batches: Iterable[WindowBatch], coords, mesh,
             seed: int) -> dict[str, float]:
  """Masked MSE and R² over fixed windows with fixed masks (batch i's key: fold_in(seed + 1, i))."""
  key = jax.random.PRNGKey(seed + 1)
  total = None
  with sharding.use_mesh(mesh):
    for i, b in enumerate(batches):
      batch = shared_to_global({"signal": b.signal, "weight": b.weight, "live": b.live}, mesh)
      sums = metrics_lib.to_host(eval_fn(params, batch, coords, jax.random.fold_in(key, i)))
      total = sums if total is None else {k: total[k] + sums[k] for k in total}
  out = metrics_lib.reduce_sums(total)
  return {"eval_loss": out["mse"], "eval_r2": out["r2"]}


def to_global(local_batch: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v)) for k, v in local_batch.items()}


def shared_to_global(batch: dict, mesh) -> dict:
  """A numpy batch every process holds whole (e.g. evaluation windows) -> global jax.Arrays
  sharded over data x fsdp; each process places only the rows of its own devices."""
  return {k: jax.make_array_from_callback(
      np.shape(v), sharding.batch_sharding(mesh, np.ndim(v)), lambda idx, v=v: np.asarray(v)[idx])
          for k, v in batch.items()}
