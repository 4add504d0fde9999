"""Pretraining: train state, optimizer, the pure train/eval steps, and the loop.

  create_train_state(config, model_cfg, mesh, ...) -> (state, shardings)
  train_step(state, batch, ...) -> (state, metrics)         pure; jit-ted by make_train_step
  eval_step(params, batch, rng, ...) -> masked sums          pure; jit-ted by make_eval_step
  train_and_evaluate(config, workdir)                       the whole job (resumes from workdir)

The batch is `{'signal': [B, P, W] float32}` sharded over data x fsdp; masks are drawn inside
the step from `fold_in(state.rng, state.step)`, so a run is a pure function of (config, data,
step): resuming at step s reproduces the uninterrupted run bit for bit on the same mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal as signal_lib
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from brainlm_jax import checkpoint as ckpt_lib
from brainlm_jax import masking as masking_lib
from brainlm_jax import metrics as metrics_lib
from brainlm_jax import recordings as recordings_lib
from brainlm_jax import sharding
from brainlm_jax.model import BrainLM, ModelConfig, count_params, masked_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------------------------
# Config checks (before anything is compiled).


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError with one clear message per problem in the config."""
  m, t = config.model, config.train
  num_devices = int(config.mesh.get("num_devices", 0) or 0) or num_devices
  problems = []
  if m.window % m.patch_len:
    problems.append(f"data.window={m.window} is not divisible by model.patch_len={m.patch_len}")
  for hid, heads, name in ((m.hidden_size, m.num_heads, "model.hidden_size/num_heads"),
                           (m.decoder_hidden_size, m.decoder_num_heads,
                            "model.decoder_hidden_size/decoder_num_heads")):
    if hid % heads:
      problems.append(f"{name}: {hid} is not divisible by {heads} heads")
  try:
    dims = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  except ValueError as e:
    problems.append(str(e))
    dims = None
  if dims:
    shards = dims["data"] * dims["fsdp"]
    if t.batch_size % shards:
      problems.append(f"train.batch_size={t.batch_size} does not divide across the data x fsdp "
                      f"axes ({dims['data']} x {dims['fsdp']} = {shards})")
    per = t.batch_size // max(shards, 1)
    if t.grad_accum_steps < 1 or per % t.grad_accum_steps:
      problems.append(f"train.grad_accum_steps={t.grad_accum_steps} must divide the per-shard "
                      f"batch {per}")
    for size, what in ((m.hidden_size, "model.hidden_size"),
                       (m.decoder_hidden_size, "model.decoder_hidden_size")):
      if size % dims["fsdp"]:
        problems.append(f"{what}={size} is not divisible by mesh.fsdp={dims['fsdp']}")
    for n, what in ((m.num_heads, "model.num_heads"), (m.decoder_num_heads,
                                                       "model.decoder_num_heads"),
                    (m.mlp_dim, "model.mlp_dim"), (m.decoder_mlp_dim, "model.decoder_mlp_dim")):
      if n % dims["tensor"]:
        problems.append(f"{what}={n} is not divisible by mesh.tensor={dims['tensor']}")
  if config.masking.mode not in masking_lib.MODES:
    problems.append(f"masking.mode={config.masking.mode!r}; expected one of {masking_lib.MODES}")
  elif not m.window % m.patch_len:
    try:
      masking_lib.num_visible(config.masking.mode, 1, m.window // m.patch_len,
                              config.masking.ratio, config.masking.forecast_patches)
    except ValueError as e:
      problems.append(str(e))
  if dims and t.eval_batch_size % (dims["data"] * dims["fsdp"]):
    problems.append(f"train.eval_batch_size={t.eval_batch_size} does not divide across the data x "
                    f"fsdp axes ({dims['data'] * dims['fsdp']})")
  if t.loss not in ("mse", "mae"):
    problems.append(f"train.loss={t.loss!r}; expected 'mse' or 'mae'")
  if t.get("on_nonfinite", "skip") not in ("skip", "stop"):
    problems.append(f"train.on_nonfinite={t.on_nonfinite!r}; expected 'skip' or 'stop'")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def model_config(config: ml_collections.ConfigDict, num_parcels: int,
                 has_coords: bool) -> ModelConfig:
  """Resolves the data-dependent fields (parcel count, spatial embedding) of config.model."""
  d = config.model.to_dict()
  if d["num_parcels"] in (-1, 0, None):
    d["num_parcels"] = num_parcels
  elif d["num_parcels"] != num_parcels:
    raise ValueError(f"model.num_parcels={d['num_parcels']} but the data has {num_parcels}")
  if d["spatial"] == "auto":
    d["spatial"] = "xyz" if has_coords else "learned"
  elif d["spatial"] == "xyz" and not has_coords:
    raise ValueError("model.spatial='xyz' needs data.coords (a `label x y z` file)")
  return ModelConfig.from_config(d)


# ----------------------------------------------------------------------------------------------
# State and optimizer.


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = min(int(t.warmup_steps), max(int(t.num_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(int(t.num_steps), warmup + 1), end_value=t.learning_rate * t.end_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices ('kernel') only; not on biases, norms, tokens or tables."""
  def is_kernel(path, _):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return bool(names) and names[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))


def _dummy_inputs(mcfg: ModelConfig, batch: int = 1):
  signal = jnp.zeros((batch, mcfg.num_parcels, mcfg.window), jnp.float32)
  coords = jnp.zeros((mcfg.num_parcels, 3), jnp.float32) if mcfg.spatial == "xyz" else None
  masking = masking_lib.no_masking(batch, mcfg.num_parcels, mcfg.num_patches)
  return signal, coords, masking


def create_train_state(mcfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int,
                       model: nn.Module | None = None):
  """Initialises the state directly into its shardings. Returns (state, state_shardings).

  `model` (default BrainLM(mcfg)) is any module taking (signal, coords, masking) (fine-tuning)."""
  model = model or BrainLM(mcfg)

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    variables = model.init(params_rng, *_dummy_inputs(mcfg))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  rng = jax.random.PRNGKey(seed)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_to_shardings(abstract, mesh)
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


# ----------------------------------------------------------------------------------------------
# Steps.


def _forward_loss(params, signal, coords, rng, *, model: BrainLM, mask_cfg, loss_kind, train,
                  masking: masking_lib.Masking | None = None):
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
  return masked_loss(pred, target, masking.mask, loss_kind), (pred, target, masking)


def train_step(state: TrainState, batch: dict, coords: jax.Array | None, *, model: BrainLM,
               tx: optax.GradientTransformation, mask_cfg, loss_kind: str, accum_steps: int,
               skip_nonfinite: bool = True) -> tuple[TrainState, dict]:
  """One optimizer update on a global batch (optionally accumulated over micro-batches).

  batch: {'signal': [B, P, W]} and, when the input pipeline draws the masks, 'ids_keep'
  [B, visible] and 'mask' [B, P, N]; otherwise masks come from fold_in(state.rng, step).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_and_grad(params, b, key):
    fn = functools.partial(_forward_loss, model=model, mask_cfg=mask_cfg, loss_kind=loss_kind,
                           train=True)
    masking = (masking_lib.Masking(ids_keep=b["ids_keep"], mask=b["mask"])
               if "ids_keep" in b else None)
    (loss, _), grads = jax.value_and_grad(fn, has_aux=True)(params, b["signal"], coords, key,
                                                             masking=masking)
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

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if skip_nonfinite:  # a NaN/inf batch leaves params and optimizer state untouched
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"train_loss": loss, "grad_norm": grad_norm,
                     "nonfinite": 1.0 - finite.astype(jnp.float32)}


def eval_step(params, batch: dict, coords, rng, *, model: BrainLM, mask_cfg, loss_kind: str):
  """Masked-reconstruction sufficient statistics on one batch (sums; see metrics.reduce_sums)."""
  _, (pred, target, masking) = _forward_loss(params, batch["signal"], coords, rng, model=model,
                                             mask_cfg=mask_cfg, loss_kind=loss_kind, train=False)
  return metrics_lib.masked_sums(pred, target, masking.mask, batch.get("weight"))


def make_train_step(model, tx, config, mesh, state_shardings):
  step = functools.partial(train_step, model=model, tx=tx, mask_cfg=config.masking,
                           loss_kind=config.train.loss, accum_steps=config.train.grad_accum_steps)
  batch_shardings = sharding.batch_sharding(mesh, 1)  # every batch leaf: leading axis split
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model, config, mesh, param_shardings):
  step = functools.partial(eval_step, model=model, mask_cfg=config.masking,
                           loss_kind=config.train.loss)
  batch_shardings = {"signal": sharding.batch_sharding(mesh, 3),
                     "weight": sharding.batch_sharding(mesh, 1)}
  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(param_shardings, batch_shardings, rep, rep),
                 out_shardings=rep)


def evaluate(eval_fn, params, batches, coords, mesh, seed: int) -> dict[str, float]:
  """Masked MSE and R² over fixed validation windows with fixed masks (deterministic)."""
  key = jax.random.PRNGKey(seed + 1)
  total = None
  for i, b in enumerate(batches):
    sums = eval_fn(params, shared_to_global(b, mesh), coords, jax.random.fold_in(key, i))
    sums = metrics_lib.to_host(sums)
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


# ----------------------------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class RunData:
  train: list
  val: list
  skipped: list
  scaler: Any
  coords: np.ndarray | None


def _prepared_dataset(d: ml_collections.ConfigDict) -> str | None:
  """The `brainlm_fmri` TFDS dataset folder that data.path names, or None (plain recordings)."""
  if not os.path.isdir(d.path):
    return None
  from data_pipelines import tfds_source  # pylint: disable=import-outside-toplevel
  try:
    return tfds_source.dataset_dir(d.path, d.get("tfds_config") or None)
  except FileNotFoundError:
    return None


def _prepare_tfds(config: ml_collections.ConfigDict, directory: str,
                  scaler_dict: dict | None) -> RunData:
  """Train/validation splits (by subject, made by the builder) and the stored scaler."""
  from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel  # (TensorFlow)
  from data_pipelines import tfds_source  # pylint: disable=import-outside-toplevel
  d = config.data
  train, info = tfds_source.load_split(directory, "train")
  splits = (info.get("subjects") or {}).keys()
  val = tfds_source.load_split(directory, "validation")[0] if "validation" in splits else []
  skipped = [{"path": r.path, "reason": f"{r.path}: {r.num_timepoints} timepoints, shorter than "
              f"window={d.window}"} for r in train + val if r.num_timepoints < d.window]
  train = [r for r in train if r.num_timepoints >= d.window]
  val = [r for r in val if r.num_timepoints >= d.window]
  if not train:
    raise ValueError(f"{directory}: no training recording has window={d.window} timepoints")
  coords = recordings_lib.load_coordinates(d.coords) if d.coords else info["coords"]
  if coords is not None and len(coords) != train[0].num_parcels:
    raise ValueError(f"{d.coords or directory}: {len(coords)} coordinates but the recordings of "
                     f"{directory} have {train[0].num_parcels} parcels")
  scaler = input_pipeline.RobustScaler.from_dict(scaler_dict or info["scaler"])
  for option in ("center_recordings", "scale_recordings"):
    if scaler_dict is None and bool(d.get(option)) != getattr(scaler, option):
      logging.warning("data.%s=%s is not used: the dataset %s stores its scaling statistics, "
                      "computed with %s=%s (rebuild it with that builder option to change it)",
                      option, d.get(option), directory, option, getattr(scaler, option))
  logging.info("Prepared dataset %s: %d train / %d validation recordings", directory,
               len(train), len(val))
  return RunData(train, val, skipped, scaler, coords)


def prepare_data(config: ml_collections.ConfigDict, scaler_dict: dict | None = None) -> RunData:
  """Loads recordings, splits by subject, fits (or restores) the robust scaler.

  data.path is either recordings (dir, glob, file) or a prepared `brainlm_fmri` TFDS dataset
  (`brainlm-prepare build`), whose subject splits and stored scaling statistics are used."""
  d = config.data
  if not d.path:
    raise ValueError("data.path is empty: set --config.data.path=DIR_OR_GLOB")
  prepared = _prepared_dataset(d)
  if prepared:
    return _prepare_tfds(config, prepared, scaler_dict)
  coords = recordings_lib.load_coordinates(d.coords) if d.coords else None
  num_parcels = d.num_parcels or (len(coords) if coords is not None else None)
  recs, skipped = recordings_lib.load_recordings(
      d.path, window=d.window, num_parcels=num_parcels, subject_pattern=d.subject_pattern)
  if coords is not None and recs[0].signal.shape[1] != len(coords):
    raise ValueError(f"data.coords {d.coords} has {len(coords)} parcels but the recordings in "
                     f"{d.path} have {recs[0].signal.shape[1]}")
  train, val = recordings_lib.split_by_subject(recs, val_fraction=d.val_fraction,
                                               seed=config.seed)
  from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel  # (TensorFlow)
  if scaler_dict is not None:
    scaler = input_pipeline.RobustScaler.from_dict(scaler_dict)
  else:
    scaler = input_pipeline.RobustScaler().fit(train, center_recordings=d.center_recordings,
                                               scale_recordings=d.scale_recordings)
  return RunData(train, val, skipped, scaler, coords)


def _write_data_report(workdir: str, data: RunData):
  report = {
      "train": [{"path": r.path, "subject": r.subject, "shape": list(r.signal.shape)}
                for r in data.train],
      "validation": [{"path": r.path, "subject": r.subject, "shape": list(r.signal.shape)}
                     for r in data.val],
      "skipped": data.skipped,
  }
  with open(os.path.join(workdir, "data_report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  for s in data.skipped:
    logging.warning("Skipped %s: %s", s["path"], s["reason"])


class _Preemption:
  """Turns SIGTERM into 'finish this step, checkpoint, exit cleanly'."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal_lib.signal(signal_lib.SIGTERM, self._handler)
    except ValueError:  # not in the main thread
      self._old = None

  def _handler(self, *_):
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal_lib.signal(signal_lib.SIGTERM, self._old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict[str, float]:
  """Runs (or resumes) pretraining in `workdir`. Returns the last logged metrics.

  `stop_at_step` ends this invocation early (after checkpointing), as a preemption would; the
  schedule still runs to `train.num_steps`, and a later call resumes exactly where it stopped.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  validate_config(config, jax.device_count())
  mesh = sharding.create_mesh(config.mesh)
  t = config.train
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  latest, saved_meta = _latest_readable_meta(checkpointer)
  if saved_meta is not None:
    _check_resume_config(saved_meta["config"], config)
  data = prepare_data(config, saved_meta["scaler"] if saved_meta else None)
  if jax.process_index() == 0:
    _write_data_report(workdir, data)
    data.scaler.save(os.path.join(workdir, "normalization.json"))
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=1))

  num_parcels = data.train[0].signal.shape[1]
  mcfg = model_config(config, num_parcels, data.coords is not None)
  model = BrainLM(mcfg)
  tx = make_optimizer(t)
  state, shardings = create_train_state(mcfg, tx, mesh, config.seed)
  logging.info("Model: %s parameters, %d parcels x %d patches; mesh %s", f"{count_params(state.params):,}",
               mcfg.num_parcels, mcfg.num_patches, dict(mesh.shape))
  if latest is not None:
    state = _restore_with_fallback(checkpointer, latest,
                                   ckpt_lib.abstract_with_shardings(state, shardings), state)
  start = int(jax.device_get(state.step))

  coords = None if data.coords is None else jax.device_put(data.coords, sharding.replicated(mesh))
  from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel  # (TensorFlow)
  local_batch = t.batch_size // jax.process_count()
  ds = input_pipeline.train_dataset(
      data.train, scaler=data.scaler, batch_size=local_batch, window=config.data.window,
      seed=config.seed, start_step=start, num_steps=t.num_steps - start,
      process_index=jax.process_index(), process_count=jax.process_count(), with_positions=True,
      masking=({**config.masking.to_dict(), "patch_len": config.model.patch_len}
               if config.masking.get("in_pipeline", False) else None))
  eval_batches = []
  if data.val:
    eval_batches = input_pipeline.eval_batches(
        data.val, scaler=data.scaler, batch_size=t.eval_batch_size, window=config.data.window,
        stride=config.data.eval_stride or None, max_windows=config.data.max_eval_windows or None)
  else:
    logging.warning("No validation recordings (data.val_fraction=0 or a dataset without a "
                    "validation split): training without eval_loss / eval_r2.")

  with jax.set_mesh(mesh):
    step_fn = make_train_step(model, tx, config, mesh, shardings)
    eval_fn = make_eval_step(model, config, mesh, shardings.params)
  meta = lambda step: {  # noqa: E731
      "config": json.loads(config.to_json_best_effort()),
      "model": dataclasses.asdict(mcfg),
      "data": {"seed": config.seed, "next_step": int(step)},
      "scaler": data.scaler.to_dict(),
      "coords": None if data.coords is None else np.asarray(data.coords).tolist(),
      "subjects": {"train": sorted({r.subject for r in data.train}),
                   "validation": sorted({r.subject for r in data.val})},
  }

  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(t.num_steps, start, t.batch_size)
  preempt = _Preemption()
  watch = _NonFiniteWatch(t.get("on_nonfinite", "skip"), [r.path for r in data.train])
  last: dict[str, float] = {}
  step = start
  if start == 0 and eval_batches:
    last = evaluate(eval_fn, state.params, eval_batches, coords, mesh, config.seed)
    writer.write(0, last)
    logging.info("step 0/%d | eval_loss %.4f | eval_r2 %.4f", t.num_steps, last["eval_loss"],
                 last["eval_r2"])
  try:
    with jax.set_mesh(mesh):
      for batch in ds.as_numpy_iterator():
        position = (batch.pop("recording"), batch.pop("start"))
        state, m = step_fn(state, to_global(batch, mesh), coords)
        step += 1
        watch.add(step, m["nonfinite"], position)
        logged = {}
        stop = preempt.requested or step == stop_at_step
        save = step % t.checkpoint_every == 0 or step == t.num_steps or stop
        if step % t.log_every == 0 or step == t.num_steps or save:
          watch.check()  # raises NonFiniteError under on_nonfinite='stop' (nothing is saved)
        if step % t.log_every == 0 or step == t.num_steps:
          m = metrics_lib.to_host(m)
          logged = {"train_loss": float(m["train_loss"]), "grad_norm": float(m["grad_norm"]),
                    "skipped_updates": watch.total}
        if eval_batches and (step % t.eval_every == 0 or step == t.num_steps):
          logged.update(evaluate(eval_fn, state.params, eval_batches, coords, mesh, config.seed))
        if logged:
          writer.write(step, logged)
          logging.info(progress.line(step, logged))
          last = logged
        if save:
          checkpointer.save(step, state, meta(step))
        if stop:
          logging.warning("Stopped at step %d (%s); checkpoint saved. Resume with --workdir %s",
                          step, "SIGTERM" if preempt.requested else "stop_at_step", workdir)
          break
  finally:
    checkpointer.close()
    writer.close()
    preempt.restore()
  return last


class NonFiniteError(FloatingPointError):
  """Training stopped on a NaN/inf loss or gradient (train.on_nonfinite='stop')."""


class _NonFiniteWatch:
  """Collects each step's on-device non-finite flag and checks them only at log/save steps.

  The train step itself never applies a NaN/inf update (params and optimizer state stay as they
  were); this names the steps and the windows of their batches, without a host sync per step.
  """

  def __init__(self, action: str, paths: list[str]):
    self.action, self.paths, self.pending, self.total = action, paths, [], 0

  def add(self, step: int, flag: jax.Array, position: tuple[np.ndarray, np.ndarray]):
    self.pending.append((step, flag, position))

  def _where(self, position) -> str:
    rec, start = position
    shown = [f"{os.path.basename(self.paths[r])}[t={s}]" for r, s in zip(rec[:4], start[:4])]
    more = f" and {len(rec) - 4} more" if len(rec) > 4 else ""
    return ", ".join(shown) + more

  def check(self):
    flags = jax.device_get([f for _, f, _ in self.pending])
    bad = [(s, p) for (s, _, p), f in zip(self.pending, flags) if float(f) > 0]
    self.pending = []
    if not bad:
      return
    self.total += len(bad)
    for s, p in bad:
      logging.warning("step %d: NaN/inf in the loss or gradients; the update was skipped "
                      "(data position: step %d, windows %s)", s, s - 1, self._where(p))
    if self.action == "stop":
      s, p = bad[0]
      raise NonFiniteError(
          f"step {s}: NaN/inf in the loss or gradients (windows {self._where(p)}); stopping as "
          "train.on_nonfinite='stop' asks. The last checkpoint holds the last finite state; "
          "set --config.train.on_nonfinite=skip to skip such updates instead.")


def _latest_readable_meta(checkpointer: ckpt_lib.Checkpointer) -> tuple[int | None, dict | None]:
  """The newest step whose metadata reads; unreadable newer steps are set aside (kept)."""
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      return step, checkpointer.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      checkpointer.set_aside(step, f"{type(e).__name__}: {e}")
  return None, None


def _restore_with_fallback(checkpointer: ckpt_lib.Checkpointer, step: int, abstract, fresh):
  """Restores `step`, or else the newest older step that restores; a corrupt one is set aside."""
  for s in [x for x in sorted(checkpointer.all_steps(), reverse=True) if x <= step]:
    try:
      state, _ = checkpointer.restore(s, abstract)
    except ckpt_lib.CheckpointError as e:
      checkpointer.set_aside(s, str(e))
      continue
    logging.info("Resumed from %s at step %d", checkpointer.directory, s)
    return state
  logging.error("No readable checkpoint left in %s; starting from step 0", checkpointer.directory)
  return fresh


def _check_resume_config(saved: dict, config: ml_collections.ConfigDict):
  """A resumed run must have the same model and data windowing as the saved one."""
  now = json.loads(config.to_json_best_effort())
  diffs = []
  for section in ("model", "masking"):
    for k, v in saved.get(section, {}).items():
      if now.get(section, {}).get(k) != v:
        diffs.append(f"{section}.{k}: checkpoint {v!r} vs now {now.get(section, {}).get(k)!r}")
  if saved.get("data", {}).get("window") != now["data"]["window"]:
    diffs.append(f"data.window: checkpoint {saved['data'].get('window')} vs now "
                 f"{now['data']['window']}")
  if diffs:
    raise ValueError("The workdir holds a checkpoint of a different run; use a new --workdir or "
                     "the same config. Differences:\n  " + "\n  ".join(diffs))
