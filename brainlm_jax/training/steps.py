"""The pure train / eval steps, their one update tail, and their jit-ted, sharded forms.

  apply_gradients(state, loss, grads, tx) -> (state, metrics)   clip + AdamW (tx), skip NaN/inf
  train_step(state, batch, coords, ...) -> (state, metrics)     one update of the objective:
                                                                 'mae' (masked reconstruction)
                                                                 or 'conn' (connectivity,
                                                                 models/objectives.py)
  eval_step(params, batch, coords, rng, ...) -> sums             the objective's statistics
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
from brainlm_jax.models import connectivity
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models import objectives
from brainlm_jax.models import token_grid
from brainlm_jax.models.brainlm import masked_loss
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.training import sharding
from brainlm_jax.training.state import TrainState, sample_window


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


def _masking(rng, batch: int, mcfg, mask_cfg) -> masking_lib.Masking:
  """The masks of a batch not drawn by the input pipeline: drawn here from the step's key."""
  return masking_lib.make_masking(rng, batch, mcfg.num_parcels, mcfg.num_patches,
                                  mode=mask_cfg.mode, ratio=mask_cfg.ratio,
                                  forecast_patches=mask_cfg.forecast_patches)


def forward_loss(params, signal, coords, rng, *, model, mask_cfg, loss_kind, train,
                 masking: masking_lib.Masking | None = None, live=None):
  """Masked-reconstruction loss of one batch -> (loss, (pred, target, masking)); live [B, P]:
  0 for the constant (dead) parcels of a window's recording, left out of the loss."""
  mask_rng, drop_rng = jax.random.split(rng)
  if masking is None:
    masking = _masking(mask_rng, signal.shape[0], model.cfg, mask_cfg)
  pred, _ = model.apply({"params": params}, signal, coords, masking, train=train,
                        rngs={"dropout": drop_rng} if train else None)
  target = signal.reshape(pred.shape)
  return masked_loss(pred, target, masking.mask, loss_kind, live), (pred, target, masking)


def connectivity_forward(params, signal, coords, rng, *, model, mask_cfg, loss_kind, train,
                         masking: masking_lib.Masking | None = None, live=None,
                         mae_weight: float = 0.0, conn_kind: str = "deviation"):
  """The connectivity objective (`models/objectives.py`) on a batch of samples that are two
  adjacent stretches of one recording, signal [B, P, window + W_t]: the encoder reads every
  token of the context (in training, the first or the last stretch, a coin flip per sample),
  its `patch_correlation` is scored against the target stretch's FC by `conn_kind`; with
  `mae_weight`, plus that times the masked-reconstruction loss of the context (a second, masked,
  pass). -> (loss, parts: {'conn_loss', 'mae_loss'?, 'pred', 'live', 'context', 'target'})."""
  split_rng, mask_rng, drop_rng = jax.random.split(rng, 3)
  cfg = model.cfg
  b = signal.shape[0]
  flip = jax.random.bernoulli(split_rng, 0.5, (b,)) if train else None
  context, target = objectives.split_pair(signal, cfg.window, flip)
  live = jnp.ones((b, cfg.num_parcels), jnp.float32) if live is None else live
  rngs = {"dropout": drop_rng} if train else None
  every = masking_lib.no_masking(b, *token_grid(cfg))
  latent = model.apply({"params": params}, context, coords, every, train=train, rngs=rngs,
                       method=type(model).encode)
  tokens = latent[:, 1:].reshape(b, cfg.num_parcels, cfg.num_patches, latent.shape[-1])
  pred = connectivity.patch_correlation(tokens, live)
  loss = objectives.LOSSES[conn_kind](pred, target, live)
  parts = {"conn_loss": loss, "pred": pred, "live": live, "context": context, "target": target}
  if mae_weight:
    if masking is None:
      masking = _masking(mask_rng, b, cfg, mask_cfg)
    rec, _ = model.apply({"params": params}, context, coords, masking, train=train, rngs=rngs)
    parts.update(rec=rec, masking=masking)
    parts["mae_loss"] = masked_loss(rec, context.reshape(rec.shape), masking.mask, loss_kind,
                                    live)
    loss = loss + mae_weight * parts["mae_loss"]
  return loss, parts


def objective_loss(params, batch: dict, coords, rng, *, model, mask_cfg, loss_kind: str,
                   objective: str = "mae", mae_weight: float = 0.0, conn_kind: str = "deviation",
                   train: bool = True) -> tuple[jax.Array, dict]:
  """The training loss of `objective` on a batch -> (loss, {name: scalar} of its parts, for the
  logs)."""
  masking = (masking_lib.Masking(ids_keep=batch["ids_keep"], mask=batch["mask"])
             if "ids_keep" in batch else None)
  kw = dict(model=model, mask_cfg=mask_cfg, loss_kind=loss_kind, train=train, masking=masking,
            live=batch.get("live"))
  if objective == "mae":
    loss, _ = forward_loss(params, batch["signal"], coords, rng, **kw)
    return loss, {}
  if objective == "conn":
    loss, parts = connectivity_forward(params, batch["signal"], coords, rng,
                                       mae_weight=mae_weight, conn_kind=conn_kind, **kw)
    return loss, {k: v for k, v in parts.items() if k.endswith("_loss")}
  raise ValueError(f"train.objective={objective!r}; expected one of {objectives.OBJECTIVES}")


def train_step(state: TrainState, batch: dict, coords: jax.Array | None, *, model,
               tx: optax.GradientTransformation, mask_cfg, loss_kind: str, accum_steps: int,
               skip_nonfinite: bool = True, objective: str = "mae",
               mae_weight: float = 0.0, conn_kind: str = "deviation") -> tuple[TrainState, dict]:
  """One optimizer update of `objective` on a global batch (optionally accumulated over
  micro-batches).

  batch: {'signal': [B, P, W]} ('conn': [B, P, window + W_t], context and target), optionally
  'live' [B, P] (0: a dead parcel, out of the loss) and, when the input pipeline draws the masks,
  'ids_keep' [B, visible] and 'mask' [B, P, N]; otherwise masks come from fold_in(state.rng,
  step). The metrics hold the objective's parts (e.g. 'conn_loss', 'mae_loss') beside
  'train_loss'.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  fn = functools.partial(objective_loss, model=model, mask_cfg=mask_cfg, loss_kind=loss_kind,
                         objective=objective, mae_weight=mae_weight, conn_kind=conn_kind)

  def loss_and_grad(params, b, key):
    (loss, parts), grads = jax.value_and_grad(fn, has_aux=True)(params, b, coords, key)
    return loss, parts, grads

  if accum_steps == 1:
    loss, parts, grads = loss_and_grad(state.params, batch, rng)
  else:
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)
    keys = jax.random.split(rng, accum_steps)

    def body(carry, xs):
      loss_sum, parts_sum, grad_sum = carry
      loss, parts, grads = loss_and_grad(state.params, *xs)
      return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, parts_sum, parts),
              jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    parts0 = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        lambda: fn(state.params, jax.tree_util.tree_map(lambda x: x[0], micro), coords,
                   keys[0])[1]))
    (loss, parts, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), parts0, zeros), (micro, keys))
    loss = loss / accum_steps
    parts = jax.tree_util.tree_map(lambda v: v / accum_steps, parts)
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
  state, metrics = apply_gradients(state, loss, grads, tx, skip_nonfinite=skip_nonfinite)
  return state, {**metrics, **parts}


def eval_step(params, batch: dict, coords, rng, *, model, mask_cfg, loss_kind: str,
              objective: str = "mae", mae_weight: float = 0.0, conn_kind: str = "deviation"):
  """Sufficient statistics of the objective on one batch (sums; see `reduce_eval_sums`): masked
  reconstruction ('mae', or 'conn' with mae_weight), and for 'conn' the squared error of the
  tokens' correlation against the target stretch's FC and of the context's own FC against it
  (the baseline: what FC of the window alone predicts), over the same pairs."""
  if objective == "mae":
    _, (pred, target, masking) = forward_loss(params, batch["signal"], coords, rng, model=model,
                                              mask_cfg=mask_cfg, loss_kind=loss_kind,
                                              train=False)
    return metrics_lib.masked_sums(pred, target, masking.mask, batch.get("weight"),
                                   live=batch.get("live"))
  _, parts = connectivity_forward(params, batch["signal"], coords, rng, model=model,
                                  mask_cfg=mask_cfg, loss_kind=loss_kind, train=False,
                                  live=batch.get("live"), mae_weight=mae_weight)
  live = parts["live"]
  if batch.get("weight") is not None:
    live = live * batch["weight"][:, None]
  w = objectives.pair_weights(live)
  fc = connectivity.pearson(parts["target"])
  base = connectivity.pearson(parts["context"])
  out = {"conn_n": w.sum(), "conn_se": (w * jnp.square(parts["pred"] - fc)).sum(),
         "conn_base_se": (w * jnp.square(base - fc)).sum()}
  for name, x in (("conn_dev", parts["pred"]), ("conn_base_dev", base)):  # [P, P] each
    out.update(zip([f"{name}_{k}" for k in PAIR_SUMS], objectives.pair_sums(x, fc, w)))
  if "rec" in parts:
    out.update(metrics_lib.masked_sums(parts["rec"], parts["context"].reshape(
        parts["rec"].shape), parts["masking"].mask, batch.get("weight"),
                                       live=batch.get("live")))
  return out


PAIR_SUMS = ("n", "x", "y", "xy", "xx", "yy")  # objectives.pair_sums, per pair of parcels


def reduce_eval_sums(total: dict, mae_weight: float = 0.0,
                     conn_kind: str = "deviation") -> dict[str, float]:
  """Evaluation metrics from `eval_step`'s summed statistics: eval_loss (the objective) and,
  with masked reconstruction, eval_r2; for 'conn', eval_conn_loss (MSE of the tokens'
  correlation against the target's FC) and eval_conn_r (the correlation of their deviations
  from the mean over all the evaluation windows, per pair: `objectives.pooled_deviation_r`, so
  it does not depend on how the windows fall into batches), each beside the same of the
  context window's own FC (`*_fc_baseline`: what FC of the window alone predicts)."""
  out = {}
  if "n" in total:
    rec = metrics_lib.reduce_sums(total)
    out.update(eval_loss=rec["mse"], eval_r2=rec["r2"])
  if "conn_n" in total:
    n = max(float(total["conn_n"]), 1.0)
    out["eval_conn_loss"] = float(total["conn_se"]) / n
    out["eval_conn_fc_baseline"] = float(total["conn_base_se"]) / n
    for name, key in (("eval_conn_r", "conn_dev"), ("eval_conn_r_fc_baseline", "conn_base_dev")):
      out[name] = objectives.pooled_deviation_r(*(total[f"{key}_{k}"] for k in PAIR_SUMS))
    main = (1.0 - out["eval_conn_r"] if conn_kind == "deviation" else out["eval_conn_loss"])
    out["eval_loss"] = main + (mae_weight * out["eval_loss"] if "eval_loss" in out else 0.0)
  return out


def objective_options(config) -> dict:
  """train_step / eval_step keyword arguments of `config`'s objective."""
  t = config.train
  return {"objective": t.get("objective", "mae"), "mae_weight": float(t.get("mae_weight", 0.0)),
          "conn_kind": t.get("conn_kind", "deviation")}


def abstract_batch(config, mcfg, batch_size: int, mesh, *, train: bool = True) -> dict:
  """The global batch a step receives, as ShapeDtypeStructs sharded over data x fsdp: what
  `input_pipeline.train_dataset` yields for `config` (train: 'signal' [B, P, sample window],
  'live' [B, P], and with `masking.in_pipeline` 'ids_keep' [B, visible] int32 and 'mask'
  [B, P, N]) or what `evaluate` feeds `make_eval_step` (signal, weight [B], live)."""
  b, p = int(batch_size), mcfg.num_parcels
  shapes = {"signal": ((b, p, sample_window(config)), np.float32),
            "live": ((b, p), np.float32)}
  if not train:
    shapes["weight"] = ((b,), np.float32)
  elif config.masking.get("in_pipeline", False):
    visible = masking_lib.num_visible(config.masking.mode, p, mcfg.num_patches,
                                      config.masking.ratio, config.masking.forecast_patches)
    shapes.update(ids_keep=((b, visible), np.int32), mask=((b, p, mcfg.num_patches), np.float32))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def make_train_step(model, tx, config, mesh, state_shardings):
  """jax.jit of `train_step` for `config` (objective, masking, loss, accumulation), donating the
  state. Call (and so trace) it inside `sharding.use_mesh(mesh)`."""
  step = functools.partial(train_step, model=model, tx=tx, mask_cfg=config.masking,
                           loss_kind=config.train.loss, accum_steps=config.train.grad_accum_steps,
                           **objective_options(config))
  batch_shardings = sharding.batch_sharding(mesh, 1)  # every batch leaf: leading axis split
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model, config, mesh, param_shardings):
  """jax.jit of `eval_step`; call it inside `sharding.use_mesh(mesh)`."""
  step = functools.partial(eval_step, model=model, mask_cfg=config.masking,
                           loss_kind=config.train.loss, **objective_options(config))
  batch_shardings = {"signal": sharding.batch_sharding(mesh, 3),
                     "weight": sharding.batch_sharding(mesh, 1),
                     "live": sharding.batch_sharding(mesh, 2)}
  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(param_shardings, batch_shardings, rep, rep),
                 out_shardings=rep)


def evaluate(eval_fn, params, batches: Iterable[WindowBatch], coords, mesh,
             seed: int, mae_weight: float = 0.0, conn_kind: str = "deviation") -> dict[str, float]:
  """The objective's evaluation (`reduce_eval_sums`: masked MSE and R², connectivity errors) over
  fixed windows with fixed masks (batch i's key: fold_in(seed + 1, i))."""
  key = jax.random.PRNGKey(seed + 1)
  total = None
  with sharding.use_mesh(mesh):
    for i, b in enumerate(batches):
      batch = shared_to_global({"signal": b.signal, "weight": b.weight, "live": b.live}, mesh)
      sums = metrics_lib.to_host(eval_fn(params, batch, coords, jax.random.fold_in(key, i)))
      total = sums if total is None else {k: total[k] + sums[k] for k in total}
  return reduce_eval_sums(total, mae_weight, conn_kind)


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
