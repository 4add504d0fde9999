"""Fine-tuning a pretrained BrainLM encoder on a task, with baselines from the same run.

  finetune(config, checkpoint, workdir) -> results      the whole job (resumes from workdir)
  restore_pretrained(checkpoint, model_overrides)       params-only restore, shape-checked
  prepare_task(config, pre, recordings) -> TaskData      labels and the held-out split
  EncoderHead(cfg, num_outputs, ...)                     encoder -> CLS / mean -> MLP head
  layer_scales(params, num_layers, decay, k)             per-leaf lr scale and trainable mask
  persistence_sums(batch, k) / context_mean_sums(...)    forecasting baselines (masked sums)

Tasks (config.task.target):
  subject-id   classification [B, subjects]: windows from the first part of each recording train,
               non-overlapping windows of the last part test (probe.py's fingerprinting).
  forecast     the pretrained masked autoencoder (encoder + decoder) with forecast masking: the last
               k patches of every parcel [B, P, k, L] are predicted from the rest; held-out
               subjects; MSE/R² next to persistence (repeat the last visible patch) and the
               context mean (each parcel's mean over its visible patches).
  a column     of a phenotype CSV/TSV: regression [B, 1] (standardised targets) or classification;
               one stratified subject fold is held out; predictions are averaged per subject.

Params of EncoderHead are {'brainlm': exactly BrainLM.encode's params (so the pretrained tree maps
1:1), 'head_hidden', 'head_out'}; for forecasting the whole BrainLM tree is fine-tuned. Layer-wise
lr decay (BEiT/ViT style): block i of L gets decay^(L - i), the embeddings decay^(L + 1), the
final LayerNorm and head 1; scanned (stacked) blocks get a per-layer scale along axis 0.
`train.trainable_layers = k >= 0` freezes the embeddings and all but the last k blocks (their
gradients are zeroed before clipping and their updates, weight decay included, are zeroed).

A run writes WORKDIR/{checkpoints/, metrics.jsonl, tensorboard/, config.json, finetune.json,
finetune.md}; the random-init baseline is its own run in WORKDIR/random_init/. Both resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from brainlm_jax import checkpoint as ckpt_lib
from brainlm_jax import masking as masking_lib
from brainlm_jax import metrics as metrics_lib
from brainlm_jax import probe
from brainlm_jax import recordings as recordings_lib
from brainlm_jax import restore
from brainlm_jax import sharding
from brainlm_jax import train as train_lib
from brainlm_jax.model import ModelConfig, count_params
from brainlm_jax.models import build_model, token_grid
from brainlm_jax.recordings import Recording

BUILTIN_TARGETS = ("subject-id", "forecast")
ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
RUNTIME_FIELDS = ("dropout", "attention", "dtype", "remat")
EMBEDDINGS = ("patch_embed", "spatial", "cls")
METRICS = {"classification": ("accuracy", "balanced_accuracy", "roc_auc"),
           "regression": ("r2", "mae", "pearson_r"), "forecast": ("mse", "r2")}
MAIN_METRIC = {"classification": "accuracy", "regression": "r2", "forecast": "mse"}
LOWER_IS_BETTER = frozenset({"mse", "mae"})


# ----------------------------------------------------------------------------------------------
# Restoring the pretrained encoder.


def restore_pretrained(checkpoint: str, model: Any = None) -> restore.Pretrained:
  """load_pretrained, then checks the expected architecture and applies run-time overrides.

  model: config.model: ARCH_FIELDS (0: accept the checkpoint's) and RUNTIME_FIELDS ("" or -1:
  keep the checkpoint's). A checkpoint of another shape raises CheckpointError naming the
  mismatching parameters.
  """
  pre = restore.load_pretrained(checkpoint)
  model = dict(model or {})
  expected = {k: int(model[k]) for k in ARCH_FIELDS if int(model.get(k, 0) or 0) > 0}
  if any(getattr(pre.model_cfg, k) != v for k, v in expected.items()):
    # Re-restoring with the expected shapes names every mismatching parameter.
    restore.load_pretrained(pre.path, model_cfg=dataclasses.replace(pre.model_cfg, **expected))
    raise ValueError(f"{pre.path}: checkpoint {({k: getattr(pre.model_cfg, k) for k in expected})}"
                     f" vs config.model {expected}")
  runtime = {k: model[k] for k in RUNTIME_FIELDS if model.get(k) not in (None, "", -1)}
  return dataclasses.replace(pre, model_cfg=dataclasses.replace(pre.model_cfg, **runtime))


# ----------------------------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass
class TaskData:
  """kind: classification | regression | forecast. train/test: recordings (for subject-id, the
  first / last part of each one). *_labels: per recording, int class index or float target (None
  for forecast). classes: class names. y_mean/y_std standardise regression targets. unit: what the
  test metrics average over ('window' or 'subject')."""
  target: str
  kind: str
  train: list
  test: list
  train_labels: np.ndarray | None = None
  test_labels: np.ndarray | None = None
  classes: list = dataclasses.field(default_factory=list)
  y_mean: float = 0.0
  y_std: float = 1.0
  unit: str = "window"
  scheme: str = ""

  @property
  def num_outputs(self) -> int:
    return len(self.classes) if self.kind == "classification" else 1

  def describe(self) -> dict:
    return {"target": self.target, "kind": self.kind, "classes": self.classes, "unit": self.unit,
            "y_mean": self.y_mean, "y_std": self.y_std, "scheme": self.scheme,
            "train_subjects": sorted({r.subject for r in self.train}),
            "test_subjects": sorted({r.subject for r in self.test}),
            "train_recordings": [r.path for r in self.train],
            "test_recordings": [r.path for r in self.test]}


def _segment(r: Recording, start: int, stop: int) -> Recording:
  return dataclasses.replace(r, signal=r.signal[start:stop])


def _subject_id_task(recs: Sequence[Recording], window: int, train_fraction: float) -> TaskData:
  if not 0 < train_fraction < 1:
    raise ValueError(f"data.train_fraction={train_fraction} must be in (0, 1)")
  train, test = [], []
  for r in recs:
    cut = int(round(r.num_timepoints * train_fraction))
    if cut < window or r.num_timepoints - cut < window:
      logging.warning("subject-id: %s (%d timepoints) cannot give a window of %d to both sides of "
                      "a %.2f split; left out", r.path, r.num_timepoints, window, train_fraction)
      continue
    train.append(_segment(r, 0, cut))
    test.append(_segment(r, cut, r.num_timepoints))
  classes = sorted({r.subject for r in train})
  if len(classes) < 2:
    raise ValueError(f"subject-id needs at least 2 subjects with recordings of >= "
                     f"{int(np.ceil(window / min(train_fraction, 1 - train_fraction)))} "
                     f"timepoints; have {len(classes)}")
  labels = np.asarray([classes.index(r.subject) for r in train], np.int64)
  return TaskData("subject-id", "classification", train, test, labels, labels.copy(), classes,
                  unit="window",
                  scheme=f"every subject on both sides: random windows of the first "
                         f"{train_fraction:.0%} of each recording train, non-overlapping windows "
                         "of the rest test")


def _phenotype_task(recs: Sequence[Recording], target: str, d: Any, kind: str,
                    seed: int) -> TaskData:
  if not d.phenotypes:
    raise ValueError(f"task.target={target!r} needs --config.data.phenotypes=FILE with a "
                     f"{target!r} column; the built-in targets are {', '.join(BUILTIN_TARGETS)}")
  table = probe.read_phenotypes(d.phenotypes, d.subject_column, target)
  values = [table.get(probe.norm_subject(r.subject)) for r in recs]
  have = [r for r, v in zip(recs, values) if v is not None]
  values = [v for v in values if v is not None]
  if not have:
    raise ValueError(f"{d.phenotypes}: no recording's subject has a {target!r} value (recording "
                     f"subjects e.g. {sorted({r.subject for r in recs})[:5]}; phenotype subjects "
                     f"e.g. {sorted(table)[:5]})")
  if len(have) < len(recs):
    logging.warning("%d recording(s) have no %r value and are left out", len(recs) - len(have),
                    target)
  if kind == "auto":
    kind = probe.infer_task(values, [r.subject for r in have])
    logging.info("target %r: %s (inferred from its values; --config.task.type chooses)", target,
                 kind)
  if kind == "regression":
    bad = sorted({v for v in values if probe.as_float(v) is None})
    if bad:
      raise ValueError(f"{d.phenotypes}: target {target!r} has non-numeric values (e.g. "
                       f"{bad[:5]}); use --config.task.type=classification")
    labels = np.asarray([probe.as_float(v) for v in values], np.float64)
  else:
    labels = np.asarray([probe.class_label(v) for v in values], object)
  per_subject = dict(zip((r.subject for r in have), labels.tolist()))
  subjects = np.asarray(sorted(per_subject))
  y = np.asarray([per_subject[s] for s in subjects], labels.dtype)
  if len(set(y.tolist())) < 2:
    raise ValueError(f"{d.phenotypes}: target {target!r} is constant: all {len(subjects)} "
                     f"subject(s) have the value {y[0]!r}; nothing to predict")
  if d.folds < 2 or len(subjects) < d.folds:
    raise ValueError(f"{d.phenotypes}: only {len(subjects)} subject(s) have a {target!r} value "
                     f"but data.folds={d.folds}: need at least 2 folds and as many subjects as "
                     f"folds; lower --config.data.folds or add subjects")
  try:
    _, test_idx = probe.subject_folds(y, subjects, kind, d.folds, seed)[0]
  except ValueError as e:  # e.g. a class with fewer subjects than folds
    raise ValueError(f"{d.phenotypes}: cannot split the {len(subjects)} subjects with a {target!r}"
                     f" value into data.folds={d.folds} stratified subject folds ({e}); lower "
                     "--config.data.folds, or use --config.task.type=regression for a numeric "
                     "target") from e
  test_subjects = set(subjects[test_idx].tolist())
  train = [r for r in have if r.subject not in test_subjects]
  test = [r for r in have if r.subject in test_subjects]
  task = TaskData(target, kind, train, test, unit="subject",
                  scheme=f"held-out subjects: 1 of {d.folds} subject folds "
                         f"({len(test_subjects)} of {len(subjects)} subjects) tests; window "
                         "predictions averaged per subject")
  y_of = lambda rs: np.asarray([per_subject[r.subject] for r in rs], labels.dtype)  # noqa: E731
  if kind == "classification":
    task.classes = probe.sorted_classes(y.tolist())
    missing = sorted(set(task.classes) - set(y_of(train).tolist()))
    if missing:
      logging.warning("classes %s have no training subject", missing)
    task.train_labels = np.asarray([task.classes.index(v) for v in y_of(train)], np.int64)
    task.test_labels = np.asarray([task.classes.index(v) for v in y_of(test)], np.int64)
  else:
    ytr = y_of(train)
    task.y_mean, task.y_std = float(ytr.mean()), float(ytr.std() or 1.0)
    task.train_labels, task.test_labels = ytr, y_of(test)
  return task


def prepare_task(config: ml_collections.ConfigDict, pre: restore.Pretrained,
                 recs: Sequence[Recording]) -> TaskData:
  """Labels and the train/test split of `recs` for config.task.target."""
  t, d = config.task, config.data
  window = pre.model_cfg.window
  if t.target == "subject-id":
    return _subject_id_task(recs, window, d.train_fraction)
  if t.target == "forecast":
    if pre.model_cfg.variant == "vitmae_image":
      raise ValueError(f"{pre.path}: task.target=forecast needs a parcels x time-patches model; "
                       "this vitmae_image checkpoint patches the recording as an image")
    masking_lib.num_visible("forecast", 1, pre.model_cfg.num_patches, 0.0, t.forecast_patches)
    train, test = recordings_lib.split_by_subject(recs, val_fraction=d.val_fraction,
                                                  seed=config.seed)
    if not test:
      raise ValueError(f"data.val_fraction={d.val_fraction}: forecasting needs held-out subjects")
    return TaskData("forecast", "forecast", train, test, unit="window",
                    scheme=f"held-out subjects ({len({r.subject for r in test})} of "
                           f"{len({r.subject for r in recs})}, data.val_fraction={d.val_fraction},"
                           f" seed {config.seed}); non-overlapping test windows")
  if t.type not in probe.TASKS:
    raise ValueError(f"task.type={t.type!r}; expected one of {probe.TASKS}")
  return _phenotype_task(recs, t.target, d, t.type, config.seed)


# ----------------------------------------------------------------------------------------------
# Model and optimizer.


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
  return optax.chain(scale_by_tree(trainable), train_lib.make_optimizer(t), scale_by_tree(both))


def _model_for(task: TaskData, cfg: ModelConfig, t: Any) -> nn.Module:
  if task.kind == "forecast":
    return build_model(cfg)
  return EncoderHead(cfg, task.num_outputs, int(t.head_hidden), t.pooling, float(t.head_dropout))


def _forecast_config(k: int) -> ml_collections.ConfigDict:
  """What train.make_train_step / make_eval_step read: forecast masking, MSE."""
  return ml_collections.ConfigDict({
      "masking": {"mode": "forecast", "ratio": 0.0, "forecast_patches": int(k)},
      "train": {"loss": "mse", "grad_accum_steps": 1}})


# ----------------------------------------------------------------------------------------------
# Steps (classification / regression; forecasting reuses train.py's MAE steps).


def task_loss(out: jax.Array, label: jax.Array, kind: str) -> jax.Array:
  """Cross-entropy on logits [B, C] with int labels, or MSE of out[:, 0] against targets."""
  if kind == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(out, label.astype(jnp.int32)).mean()
  return jnp.mean(jnp.square(out[:, 0] - label.astype(jnp.float32)))


def supervised_step(state: train_lib.TrainState, batch: dict, coords, *, model: nn.Module,
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
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = (optax.apply_updates(state.params, updates), opt_state)
  params, opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new,
                                             (state.params, state.opt_state))
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {"train_loss": loss, "grad_norm": grad_norm,
           "nonfinite": 1.0 - finite.astype(jnp.float32)})


def _predict_fn(model: nn.Module):
  cfg = model.cfg

  def fn(params, signal, coords):
    masking = masking_lib.no_masking(signal.shape[0], *token_grid(cfg))
    return model.apply({"params": params}, signal, coords, masking, train=False)
  return jax.jit(fn)


# ----------------------------------------------------------------------------------------------
# Evaluation and baselines.


def _point(v: float) -> dict:
  return {"mean": float(v), "ci95": [float("nan"), float("nan")]}


def _test_windows(task: TaskData, pre: restore.Pretrained, batch_size: int,
                  max_windows: int = 0):
  """(signal [n, P, W] batches as WindowBatch list, recording index [n]) of the test side."""
  batches = list(restore.iter_windows(task.test, pre.scaler, window=pre.model_cfg.window,
                                      batch_size=batch_size))
  if max_windows:
    kept, n = [], 0
    for b in batches:
      if n >= max_windows:
        break
      kept.append(b)
      n += b.n
    batches = kept
  return batches


def score_predictions(task: TaskData, out: np.ndarray, recording: np.ndarray) -> dict:
  """Window outputs [n, C] (logits or standardised predictions) of test recordings -> metrics,
  per window or averaged per subject (task.unit)."""
  if task.kind == "classification":
    values = np.exp(out - out.max(axis=1, keepdims=True))
    values /= values.sum(axis=1, keepdims=True)
  else:
    values = out[:, :1] * task.y_std + task.y_mean
  labels = task.test_labels[recording]
  if task.unit == "subject":
    subjects = np.asarray([task.test[i].subject for i in recording])
    units = sorted(set(subjects.tolist()))
    values = np.stack([values[subjects == s].mean(axis=0) for s in units])
    labels = np.asarray([labels[subjects == s][0] for s in units])
  if task.kind == "classification":
    names = np.asarray(task.classes, object)
    m = probe.score("classification", names[labels], names[values.argmax(axis=1)], values,
                    list(task.classes))
  else:
    m = probe.score("regression", labels.astype(np.float64), values[:, 0], None, [])
  return {k: float(v) for k, v in m.items()}


def fc_baseline(task: TaskData, pre: restore.Pretrained, test_batches, seed: int) -> dict:
  """Linear probe (probe.py's) on window FC features: trained on the non-overlapping windows of the
  training side, scored on the test windows exactly like the fine-tuned model."""
  feats, recs = [], []
  for b in restore.iter_windows(task.train, pre.scaler, window=pre.model_cfg.window,
                                batch_size=64):
    feats.append(probe.fc_features(b.signal[:b.n])), recs.append(b.recording)
  x_tr, r_tr = np.concatenate(feats), np.concatenate(recs)
  x_te = np.concatenate([probe.fc_features(b.signal[:b.n]) for b in test_batches])
  r_te = np.concatenate([b.recording[:b.n] for b in test_batches])
  if task.kind == "classification":
    names = np.asarray(task.classes, object)
    _, proba = probe.fit_predict("classification", x_tr, names[task.train_labels[r_tr]], x_te,
                                 list(task.classes), seed)
    out = np.log(np.maximum(proba, 1e-12))
  else:
    pred, _ = probe.fit_predict("regression", x_tr, task.train_labels[r_tr], x_te, [], seed)
    out = ((pred - task.y_mean) / task.y_std)[:, None]
  return {"metrics": score_predictions(task, out, r_te), "dim": int(x_tr.shape[1])}


def persistence_sums(signal: np.ndarray, mask: np.ndarray, weight: np.ndarray, patch_len: int,
                     k: int) -> dict:
  """Masked sums of 'repeat the last visible patch' for the last k patches. signal [B, P, W]."""
  b, p, w = signal.shape
  patches = signal.reshape(b, p, w // patch_len, patch_len)
  pred = np.repeat(patches[:, :, -k - 1:-k], w // patch_len, axis=2)
  return metrics_lib.masked_sums(pred, patches, mask, weight)


def context_mean_sums(signal: np.ndarray, mask: np.ndarray, weight: np.ndarray, patch_len: int,
                      k: int) -> dict:
  """Masked sums of 'each parcel's mean over its visible timepoints' for the last k patches."""
  b, p, w = signal.shape
  patches = signal.reshape(b, p, w // patch_len, patch_len)
  mean = signal[:, :, : w - k * patch_len].mean(axis=-1)[:, :, None, None]
  return metrics_lib.masked_sums(np.broadcast_to(mean, patches.shape), patches, mask, weight)


def forecast_baselines(batches: list, cfg: ModelConfig, k: int) -> list[dict]:
  rows = []
  for name, fn in (("persistence", persistence_sums), ("context-mean", context_mean_sums)):
    total = None
    for b in batches:
      n = b["signal"].shape[0]
      mask = np.asarray(masking_lib.make_masking(jax.random.PRNGKey(0), n, cfg.num_parcels,
                                                 cfg.num_patches, mode="forecast", ratio=0.0,
                                                 forecast_patches=k).mask)
      sums = metrics_lib.to_host(fn(b["signal"], mask, b["weight"], cfg.patch_len, k))
      total = sums if total is None else {key: total[key] + sums[key] for key in total}
    rows.append({"name": name, "source": "baseline", "dim": 0,
                 "metrics": {m: _point(v) for m, v in metrics_lib.reduce_sums(total).items()}})
  return rows


# ----------------------------------------------------------------------------------------------
# One fine-tuning run.


@dataclasses.dataclass
class _Run:
  """What a run's loop needs, built once per (task, init)."""
  model: nn.Module
  tx: optax.GradientTransformation
  state: Any
  shardings: Any
  step_fn: Callable
  evaluate: Callable[[Any], dict]
  batches: Callable[[int], Any]  # start step -> iterator of numpy batches


def _labelled_batches(task: TaskData, pre, config, start: int):
  from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel  # (TF)
  t = config.train
  ds = input_pipeline.train_dataset(
      task.train, scaler=pre.scaler, batch_size=t.batch_size // jax.process_count(),
      window=pre.model_cfg.window, seed=config.seed, start_step=start,
      num_steps=t.num_steps - start, process_index=jax.process_index(),
      process_count=jax.process_count(), with_positions=task.kind != "forecast")
  for b in ds.as_numpy_iterator():
    if task.kind == "forecast":
      yield {"signal": b["signal"]}
      continue
    label = task.train_labels[b["recording"]]
    if task.kind == "regression":
      label = ((label - task.y_mean) / task.y_std).astype(np.float32)
    yield {"signal": b["signal"], "label": label}


# Compiled steps per (model, optimizer config, task kind, forecast k, mesh): the random-init
# baseline and a resumed run in the same process reuse the pretrained run's executables.
_COMPILED: dict = {}


def _compiled(model: nn.Module, t: Any, kind: str, k: int, mesh, seed: int):
  """-> (tx, state shardings, step_fn, eval_fn) and a fresh state (random init, `seed`)."""
  key = (model, t.to_json(), kind, k, mesh, seed)
  if key in _COMPILED:
    tx, shardings, step_fn, eval_fn, host_state = _COMPILED[key]
    return tx, shardings, step_fn, eval_fn, jax.device_put(host_state, shardings)
  dummy = train_lib._dummy_inputs(model.cfg)  # pylint: disable=protected-access
  abstract = nn.unbox(jax.eval_shape(lambda r: model.init(r, *dummy)["params"],
                                     jax.random.PRNGKey(0)))
  tx = make_optimizer(t, abstract, model.cfg.num_layers)
  state, shardings = train_lib.create_train_state(model.cfg, tx, mesh, seed, model=model)
  rep = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    if kind == "forecast":
      fcfg = _forecast_config(k)
      step_fn = train_lib.make_train_step(model, tx, fcfg, mesh, shardings)
      eval_fn = train_lib.make_eval_step(model, fcfg, mesh, shardings.params)
    else:
      step_fn = jax.jit(
          functools.partial(supervised_step, model=model, tx=tx, kind=kind),
          in_shardings=(shardings, {"signal": sharding.batch_sharding(mesh, 3),
                                    "label": sharding.batch_sharding(mesh, 1)}, rep),
          out_shardings=(shardings, rep), donate_argnums=(0,))
      eval_fn = _predict_fn(model)
  _COMPILED[key] = (tx, shardings, step_fn, eval_fn, jax.device_get(state))
  return tx, shardings, step_fn, eval_fn, state


def _build_run(config, task: TaskData, pre, mesh, coords, test) -> _Run:
  model = _model_for(task, pre.model_cfg, config.task)
  tx, shardings, step_fn, eval_fn, state = _compiled(
      model, config.train, task.kind, int(config.task.forecast_patches), mesh, config.seed)
  if task.kind == "forecast":
    def evaluate(params):
      r = train_lib.evaluate(eval_fn, params, test, coords, mesh, config.seed)
      return {"mse": r["eval_loss"], "r2": r["eval_r2"]}
  else:
    def evaluate(params):
      outs, recs = [], []
      for b in test:
        out = eval_fn(params, train_lib.to_global({"signal": b.signal}, mesh)["signal"], coords)
        outs.append(np.asarray(jax.device_get(out))[:b.n]), recs.append(b.recording[:b.n])
      return score_predictions(task, np.concatenate(outs), np.concatenate(recs))
  return _Run(model, tx, state, shardings, step_fn, evaluate,
              lambda start: _labelled_batches(task, pre, config, start))


def _place_pretrained(state, shardings, pre: restore.Pretrained, kind: str):
  """The pretrained params into the fresh state, resharded onto the run's mesh."""
  if kind == "forecast":
    params = pre.params
  else:
    params = dict(state.params)
    params["brainlm"] = {k: pre.params[k] for k in state.params["brainlm"]}
  return state.replace(params=jax.device_put(params, shardings.params))


def run_training(config, task: TaskData, pre: restore.Pretrained, workdir: str, *,
                 init: str = "pretrained", stop_at_step: int | None = None) -> dict:
  """Fine-tunes (or resumes) in `workdir` from the pretrained or a random ('random') init.

  Returns {'final': test metrics, 'step0': test metrics before training, 'trainable_params',
  'finished' (False when stop_at_step ended it early), 'steps', 'params'}.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  mesh = sharding.create_mesh(config.mesh)
  coords = None if pre.coords is None else jax.device_put(pre.coords, sharding.replicated(mesh))
  if task.kind == "forecast":
    from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel  # (TF)
    test = input_pipeline.eval_batches(task.test, scaler=pre.scaler,
                                       batch_size=config.data.eval_batch_size,
                                       window=pre.model_cfg.window,
                                       max_windows=config.data.max_eval_windows or None)
  else:
    test = _test_windows(task, pre, config.data.eval_batch_size, config.data.max_eval_windows)
  run = _build_run(config, task, pre, mesh, coords, test)
  state = run.state
  identity = {"task": task.describe(), "init": init, "model": dataclasses.asdict(pre.model_cfg),
              "pretrained": {"path": pre.path, "step": pre.step}}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  latest, step0 = checkpointer.latest_step(), {}
  if latest is not None:
    saved = checkpointer.restore_meta(latest)
    _check_same_run(saved.get("identity", {}), identity, checkpointer.directory)
    step0 = dict(saved.get("step0") or {})
    state, _ = checkpointer.restore(latest, ckpt_lib.abstract_with_shardings(state,
                                                                              run.shardings))
    logging.info("Resumed fine-tuning from %s at step %d", checkpointer.directory, latest)
  elif init == "pretrained":
    state = _place_pretrained(state, run.shardings, pre, task.kind)
  _, trainable = layer_scales(jax.device_get(state.params), pre.model_cfg.num_layers,
                              t.layer_decay, t.trainable_layers)
  n_train = count_trainable(trainable, state.params)
  start = int(jax.device_get(state.step))
  logging.info("Fine-tuning %s (%s init): %s of %s parameters trained; mesh %s; steps %d..%d",
               task.target, init, f"{n_train:,}", f"{count_params(state.params):,}",
               dict(mesh.shape), start, t.num_steps)
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(t.num_steps, start, t.batch_size)
  prefix = "test_"
  if start == 0:
    step0 = run.evaluate(state.params)
    writer.write(0, {prefix + k: v for k, v in step0.items()})
    logging.info("step 0/%d | %s", t.num_steps, _fmt(step0, prefix))
  config_json = json.loads(config.to_json_best_effort())
  meta = lambda step: {"identity": identity, "config": config_json, "step0": step0,  # noqa: E731
                       "data": {"seed": config.seed, "next_step": int(step)}}
  last, step, finished = {}, start, start >= t.num_steps
  try:
    with jax.set_mesh(mesh):
      for batch in run.batches(start):
        state, m = run.step_fn(state, train_lib.to_global(batch, mesh), coords)
        step += 1
        logged = {}
        if step % t.log_every == 0 or step == t.num_steps:
          m = metrics_lib.to_host(m)
          if m["nonfinite"] > 0:
            logging.warning("step %d: non-finite loss/gradients; the update was skipped", step)
          logged = {"train_loss": float(m["train_loss"]), "grad_norm": float(m["grad_norm"])}
        if step % t.eval_every == 0 or step == t.num_steps:
          last = run.evaluate(state.params)
          logged.update({prefix + k: v for k, v in last.items()})
        if logged:
          writer.write(step, logged)
          logging.info(progress.line(step, logged))
        stop = step == stop_at_step
        if step % t.checkpoint_every == 0 or step == t.num_steps or stop:
          checkpointer.save(step, state, meta(step))
        if stop and step < t.num_steps:
          logging.warning("Stopped at step %d (stop_at_step); resume with the same --workdir %s",
                          step, workdir)
          break
      else:
        finished = True
  finally:
    checkpointer.close()
    writer.close()
  if finished and not last:
    last = run.evaluate(state.params)
  return {"final": last, "step0": step0, "trainable_params": n_train, "finished": finished,
          "params": state.params, "steps": int(jax.device_get(state.step))}


def _fmt(metrics: dict, prefix: str = "") -> str:
  return " | ".join(f"{prefix}{k} {v:.4f}" for k, v in metrics.items())


def _check_same_run(saved: dict, now: dict, where: str):
  diffs = [k for k in ("init", "model", "pretrained") if saved.get(k) != now.get(k)]
  for k in ("target", "kind", "classes", "train_recordings", "test_recordings"):
    if saved.get("task", {}).get(k) != now["task"].get(k):
      diffs.append(f"task.{k}")
  if diffs:
    raise ValueError(f"{where} holds a fine-tuning checkpoint of a different run (differs in: "
                     f"{', '.join(diffs)}); use a new --workdir or the same config and checkpoint")


# ----------------------------------------------------------------------------------------------
# The job.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  t = config.train
  problems = []
  try:
    dims = sharding.mesh_shape(config.mesh, int(config.mesh.num_devices or 0) or num_devices)
    shards = dims[0] * dims[1]
    for name, b in (("train.batch_size", t.batch_size),
                    ("data.eval_batch_size", config.data.eval_batch_size)):
      if b < 1 or b % shards:
        problems.append(f"{name}={b} does not divide across the data x fsdp axes ({shards})")
  except ValueError as e:
    problems.append(str(e))
  if not 0 < t.layer_decay <= 1:
    problems.append(f"train.layer_decay={t.layer_decay} must be in (0, 1]")
  if t.num_steps < 1:
    problems.append(f"train.num_steps={t.num_steps} must be >= 1")
  if config.task.pooling not in ("cls", "mean"):
    problems.append(f"task.pooling={config.task.pooling!r}; expected 'cls' or 'mean'")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def load_task_recordings(config, pre: restore.Pretrained) -> tuple[list, list, str]:
  """The recordings (data.path, default the pretraining run's), checked against the model."""
  data_cfg = pre.config.get("data", {})
  path = config.data.path or data_cfg.get("path")
  if not path:
    raise ValueError(f"no data.path given and the checkpoint {pre.path} stores none")
  recs, skipped = recordings_lib.load_recordings(
      path, window=pre.model_cfg.window, num_parcels=pre.model_cfg.num_parcels,
      subject_pattern=data_cfg.get("subject_pattern") or recordings_lib.DEFAULT_SUBJECT_PATTERN)
  restore.check_inputs(pre, recs)
  return recs, skipped, str(path)


def finetune(config: ml_collections.ConfigDict, checkpoint: str, workdir: str, *,
             stop_at_step: int | None = None) -> dict:
  """Restore -> task -> fine-tune (and the random-init baseline) -> baselines -> report.

  Returns the results (also in WORKDIR/finetune.json and .md); {'finished': False} when
  `stop_at_step` ended the main run early (re-run to resume).
  """
  workdir = os.path.abspath(workdir)
  validate_config(config, jax.device_count())
  pre = restore_pretrained(checkpoint, config.model)
  recs, skipped, data_path = load_task_recordings(config, pre)
  task = prepare_task(config, pre, recs)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=1))
  logging.info("Task %s (%s): %d train / %d test recordings; %s", task.target, task.kind,
               len(task.train), len(task.test), task.scheme)
  main = run_training(config, task, pre, workdir, stop_at_step=stop_at_step)
  if not main["finished"]:
    return {"finished": False, "steps": main["steps"]}
  kind = task.kind
  rows = [_row("fine-tuned", "pretrained", main["trainable_params"], main["final"])]
  if kind == "forecast":
    rows.append(_row("before fine-tuning", "pretrained", 0, main["step0"]))
  if config.baselines.random_init:
    rand = run_training(config, task, pre, os.path.join(workdir, "random_init"), init="random")
    rows.append(_row("fine-tuned", "random-init", rand["trainable_params"], rand["final"]))
  chance = {}
  if kind == "forecast":
    from brainlm_jax import input_pipeline  # pylint: disable=import-outside-toplevel  # (TF)
    test = input_pipeline.eval_batches(task.test, scaler=pre.scaler,
                                       batch_size=config.data.eval_batch_size,
                                       window=pre.model_cfg.window,
                                       max_windows=config.data.max_eval_windows or None)
    rows += forecast_baselines(test, pre.model_cfg, config.task.forecast_patches)
  else:
    test = _test_windows(task, pre, config.data.eval_batch_size, config.data.max_eval_windows)
    if config.baselines.fc:
      fc = fc_baseline(task, pre, test, config.seed)
      rows.append(_row("fc linear probe", "fc", fc["dim"], fc["metrics"]))
    if task.unit == "subject":  # one label per test subject
      y = np.asarray(list({r.subject: l for r, l in zip(task.test, task.test_labels)}.values()))
    else:
      y = np.concatenate([task.test_labels[b.recording[:b.n]] for b in test])
    if kind == "classification":
      names = np.asarray(task.classes, object)
      chance = probe.chance("classification", names[y], list(task.classes))
    else:
      chance = probe.chance("regression", y.astype(np.float64), [])
  results = {
      "target": task.target, "task": kind, "main_metric": MAIN_METRIC[kind],
      "scheme": task.scheme, "unit": task.unit,
      "checkpoint": {"path": pre.path, "step": pre.step}, "data": data_path,
      "n_train_recordings": len(task.train), "n_test_recordings": len(task.test),
      "n_test_windows": int(sum(b["weight"].sum() if isinstance(b, dict) else b.n for b in test)),
      "train_subjects": sorted({r.subject for r in task.train}),
      "test_subjects": sorted({r.subject for r in task.test}),
      "pretraining_overlap": {
          "train": len({r.subject for r in task.test} & set(pre.subjects.get("train", []))),
          "validation": len({r.subject for r in task.test} &
                            set(pre.subjects.get("validation", [])))},
      "classes": task.classes, "chance": chance, "rows": rows,
      "skipped_recordings": skipped, "steps": main["steps"],
      "options": {k: config.train[k] for k in ("num_steps", "batch_size", "learning_rate",
                                               "layer_decay", "trainable_layers")},
      "finished": True,
  }
  results["report"] = write_report(results, workdir)
  return results


def _row(name: str, source: str, dim: int, metrics: dict) -> dict:
  return {"name": name, "source": source, "dim": int(dim),
          "metrics": {m: _point(v) for m, v in metrics.items()}}


# ----------------------------------------------------------------------------------------------
# Report.


def format_table(results: dict) -> str:
  """Markdown: one row per model/baseline, best per metric in bold, chance last."""
  rows = results["rows"]
  metrics = list(METRICS[results["task"]])
  best = {}
  for m in metrics:
    vals = [r["metrics"][m]["mean"] for r in rows if m in r["metrics"]
            and r["metrics"][m]["mean"] is not None and np.isfinite(r["metrics"][m]["mean"])]
    if vals:
      best[m] = (min if m in LOWER_IS_BETTER else max)(vals)
  lines = ["| model | init / source | trained params or features | " + " | ".join(
      m + (" ↓" if m in LOWER_IS_BETTER else "") for m in metrics) + " |",
           "|---|---|---:|" + "---:|" * len(metrics)]
  for r in rows:
    cells = []
    for m in metrics:
      v = r["metrics"].get(m, {}).get("mean")
      s = "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"
      cells.append(f"**{s}**" if m in best and v == best[m] else s)
    lines.append(f"| {r['name']} | {r['source']} | {r['dim']:,} | " + " | ".join(cells) + " |")
  if results.get("chance"):
    lines.append("| *chance / majority* | | | " + " | ".join(
        f"*{results['chance'][m]:.3f}*" if m in results["chance"] else "" for m in metrics) + " |")
  return "\n".join(lines)


def write_report(results: dict, workdir: str) -> dict[str, str]:
  """WORKDIR/finetune.json (everything) and finetune.md (the table). Returns their paths."""
  results = probe._jsonable(results)  # pylint: disable=protected-access
  paths = {k: os.path.join(workdir, f"finetune.{k}") for k in ("json", "md")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
    f.write("\n")
  head = [f"# Fine-tuning: `{results['target']}` ({results['task']})", "",
          f"- pretrained checkpoint: `{results['checkpoint']['path']}` (step "
          f"{results['checkpoint']['step']}); data `{results['data']}`",
          f"- split: {results['scheme']}",
          f"- {results['n_train_recordings']} training / {results['n_test_recordings']} test "
          f"recordings, {results['n_test_windows']} test windows; metrics per {results['unit']}",
          f"- {results['steps']} steps; every row is from this run, on the same test data"]
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write("\n".join(head) + "\n\n" + format_table(results) + "\n")
  return paths


def count_trainable(trainable: Any, params: Any) -> int:
  return int(sum(np.sum(np.broadcast_to(m, np.shape(p)))
                 for m, p in zip(jax.tree_util.tree_leaves(trainable),
                                 jax.tree_util.tree_leaves(params))))


__all__ = ["EncoderHead", "TaskData", "count_trainable", "finetune", "format_table",
           "layer_scales", "make_optimizer", "persistence_sums", "prepare_task",
           "restore_pretrained", "run_training", "scale_by_tree", "write_report"]
