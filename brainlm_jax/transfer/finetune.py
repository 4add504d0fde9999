"""Fine-tuning a pretrained encoder on a task, with baselines from the same run.

  results = Finetune(config).run(restore_pretrained(checkpoint, config.model), workdir)

Tasks (`tasks.py`, config.task.target): subject-id, forecast (the pretrained masked autoencoder,
encoder + decoder, with forecast masking: the last k patches of every parcel predicted from the
rest, held-out subjects) or a phenotype column (regression / classification, a held-out subject
fold). The model (`heads.py`) trains with `training.loop.train_loop`, the loop pretraining uses:
the same checkpoints, SIGTERM -> save -> return (the CLI exits 0) and bit-exact resume.
Baselines in the same report: the same network fine-tuned from a random init (its own run in
WORKDIR/random_init/), a linear probe on FC features of the same split, chance; for forecasting
the model before fine-tuning, persistence (the last visible patch) and the context mean.

A run writes WORKDIR/{checkpoints/, metrics.jsonl, tensorboard/, config.json, finetune.json,
finetune.md}; WORKDIR may be a bucket (gs://, `training.storage`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from brainlm_jax.data.windows import WindowBatch, iter_windows
from brainlm_jax.models import build_model
from brainlm_jax.models.brainlm import count_params
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.training import steps
from brainlm_jax.training import storage
from brainlm_jax.training.loop import train_loop
from brainlm_jax.transfer import baselines as baselines_lib
from brainlm_jax.transfer import functions
from brainlm_jax.transfer import heads
from brainlm_jax.transfer import labels
from brainlm_jax.transfer import linear
from brainlm_jax.transfer import report
from brainlm_jax.transfer.features import fc_features
from brainlm_jax.transfer.run import Evaluator, Pretrained, load_pretrained
from brainlm_jax.transfer.tasks import TaskData, prepare_task
from brainlm_jax.transfer.tasks import score_predictions, subject_outputs  # noqa: F401

ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
RUNTIME_FIELDS = ("dropout", "attention", "dtype", "remat")
METRICS = {"classification": ("accuracy", "balanced_accuracy", "roc_auc"),
           "regression": ("r2", "mae", "pearson_r"), "forecast": ("mse", "r2")}
MAIN_METRIC = {"classification": "accuracy", "regression": "r2", "forecast": "mse"}
_PREFIX = "test_"


def restore_pretrained(checkpoint: str, model: Any = None) -> Pretrained:
  """load_pretrained, then checks the expected architecture and applies run-time overrides.

  model: config.model: ARCH_FIELDS (0: accept the checkpoint's) and RUNTIME_FIELDS ("" or -1:
  keep the checkpoint's). A checkpoint of another shape raises CheckpointError naming the
  mismatching parameters.
  """
  pre = load_pretrained(checkpoint)
  model = dict(model or {})
  expected = {k: int(model[k]) for k in ARCH_FIELDS if int(model.get(k, 0) or 0) > 0}
  if any(getattr(pre.model_cfg, k) != v for k, v in expected.items()):
    # Re-restoring with the expected shapes names every mismatching parameter.
    load_pretrained(pre.path, model_cfg=dataclasses.replace(pre.model_cfg, **expected))
    raise ValueError(f"{pre.path}: checkpoint {({k: getattr(pre.model_cfg, k) for k in expected})}"
                     f" vs config.model {expected}")
  runtime = {k: model[k] for k in RUNTIME_FIELDS if model.get(k) not in (None, "", -1)}
  if "dtype" in runtime:  # 'auto': bf16 on accelerators, float32 on CPU
    runtime["dtype"] = state_lib.compute_dtype(runtime["dtype"])
  return dataclasses.replace(pre, model_cfg=dataclasses.replace(pre.model_cfg, **runtime))


# ----------------------------------------------------------------------------------------------
# Scores and baselines.


def test_windows(task: TaskData, pre: Pretrained, data_cfg) -> list[WindowBatch]:
  """The test side's non-overlapping windows (the first data.max_eval_windows; 0: all)."""
  return list(iter_windows(task.test, pre.scaler, window=pre.model_cfg.window,
                           batch_size=data_cfg.eval_batch_size,
                           max_windows=data_cfg.max_eval_windows or None))


def fc_baseline(task: TaskData, pre: Pretrained, test: list[WindowBatch], seed: int) -> dict:
  """Linear probe on window FC features: trained on the non-overlapping windows of the training
  side, scored on the test windows exactly like the fine-tuned model."""
  feats, recs = [], []
  for b in iter_windows(task.train, pre.scaler, window=pre.model_cfg.window, batch_size=64):
    feats.append(fc_features(b.signal[:b.n], live=b.live[:b.n])), recs.append(b.recording)
  x_tr, r_tr = np.concatenate(feats), np.concatenate(recs)
  x_te = np.concatenate([fc_features(b.signal[:b.n], live=b.live[:b.n]) for b in test])
  r_te = np.concatenate([b.recording[:b.n] for b in test])
  if task.kind == "classification":
    names = np.asarray(task.classes, object)
    _, proba = linear.fit_predict("classification", x_tr, names[task.train_labels[r_tr]], x_te,
                                  list(task.classes), seed)
    out = np.log(np.maximum(proba, 1e-12))
  else:
    pred, _ = linear.fit_predict("regression", x_tr, task.train_labels[r_tr], x_te, [], seed)
    out = ((pred - task.y_mean) / task.y_std)[:, None]
  return {"metrics": score_predictions(task, out, r_te), "dim": int(x_tr.shape[1])}


def forecast_baselines(batches: list[WindowBatch], cfg, k: int) -> list[dict]:
  """Persistence (the last visible patch, copied) and the context mean (each parcel's mean over
  its visible patches) on the forecast of the last k patches."""
  t, l = cfg.num_patches, cfg.patch_len
  fns = {"persistence": functools.partial(baselines_lib.persistence, last="patch"),
         "context-mean": baselines_lib.parcel_mean}
  rows = []
  for name, fn in fns.items():
    total = None
    for b in batches:
      patches = b.signal.reshape(len(b.signal), cfg.num_parcels, t, l)
      mask = np.broadcast_to((np.arange(t) >= t - k).astype(np.float32), patches.shape[:3])
      sums = metrics_lib.to_host(metrics_lib.masked_sums(fn(patches, mask), patches, mask,
                                                         b.weight, live=b.live))
      total = sums if total is None else {key: total[key] + sums[key] for key in total}
    rows.append(_row(name, "baseline", 0, metrics_lib.reduce_sums(total)))
  return rows


# ----------------------------------------------------------------------------------------------
# One fine-tuning run.


def _forecast_config(k: int) -> ml_collections.ConfigDict:
  """What steps.make_train_step / make_eval_step read: forecast masking, MSE."""
  return ml_collections.ConfigDict({
      "masking": {"mode": "forecast", "ratio": 0.0, "forecast_patches": int(k)},
      "train": {"loss": "mse", "grad_accum_steps": 1}})


@dataclasses.dataclass
class _Run:
  """What a run's loop needs, built once per (task, init)."""
  state: Any
  shardings: Any
  step_fn: Callable
  evaluate: Callable[[Any], dict]
  eval_fn: Callable | None = None


# Compiled steps per (model, optimizer config, task kind, forecast k, mesh): the random-init
# baseline, other seeds and folds, and a resumed run in the same process reuse the executables.
_COMPILED: dict = {}
_FRESH: dict = {}


def _model(config, task: TaskData, pre: Pretrained) -> nn.Module:
  t = config.task
  if task.kind == "forecast":
    return build_model(pre.model_cfg)
  return heads.EncoderHead(
      pre.model_cfg, task.num_outputs, int(t.head_hidden), t.pooling, float(t.head_dropout),
      frozen_encoder=heads.parse_trainable(config.train.trainable)[0] == "head",
      with_decoder=float(config.train.get("aux_mae_weight", 0.0)) > 0)


def _compiled(model: nn.Module, t: Any, kind: str, k: int, mesh, seed: int, mask_cfg=None):
  """-> (state shardings, step_fn, eval_fn) and a fresh state (random init, `seed`)."""
  key = (model, t.to_json(), kind, k, mesh, None if mask_cfg is None else mask_cfg.to_json())
  if (key, seed) not in _FRESH:
    tx = heads.make_optimizer(t, state_lib.abstract_params_of(model), model.cfg.num_layers)
    state, shardings = state_lib.create_train_state(model.cfg, tx, mesh, seed, model=model)
    _FRESH[key, seed] = (shardings, jax.device_get(state))
  shardings, host_state = _FRESH[key, seed]
  if key not in _COMPILED:
    tx = heads.make_optimizer(t, state_lib.abstract_params_of(model), model.cfg.num_layers)
    if kind == "forecast":
      fcfg = _forecast_config(k)
      step_fn = steps.make_train_step(model, tx, fcfg, mesh, shardings)
      eval_fn = steps.make_eval_step(model, fcfg, mesh, shardings.params)
    else:
      rep = sharding.replicated(mesh)
      step_fn = jax.jit(
          functools.partial(heads.supervised_step, model=model, tx=tx, kind=kind,
                            aux_weight=float(t.get("aux_mae_weight", 0.0)), mask_cfg=mask_cfg),
          in_shardings=(shardings, {"signal": sharding.batch_sharding(mesh, 3),
                                    "label": sharding.batch_sharding(mesh, 1),
                                    "live": sharding.batch_sharding(mesh, 2)}, rep),
          out_shardings=(shardings, rep), donate_argnums=(0,))
      eval_fn = functions.on_mesh(heads.predict_fn(model), mesh)
    _COMPILED[key] = (step_fn, eval_fn)
  step_fn, eval_fn = _COMPILED[key]
  return shardings, step_fn, eval_fn, jax.device_put(host_state, shardings)


def predict(eval_fn, params, batches: list[WindowBatch], mesh, coords) -> tuple[np.ndarray, ...]:
  """The head's outputs [n, C] on `batches` and their recordings [n]."""
  outs, recs = [], []
  for b in batches:
    g = steps.to_global({"signal": b.signal, "live": b.live}, mesh)
    out = eval_fn(params, g["signal"], coords, g["live"])
    outs.append(np.asarray(jax.device_get(out))[:b.n]), recs.append(b.recording[:b.n])
  return np.concatenate(outs), np.concatenate(recs)


def _aux_masking(config, pre: Pretrained):
  """The pretraining run's masking, for the auxiliary reconstruction term (None: no term)."""
  if not float(config.train.get("aux_mae_weight", 0.0)):
    return None
  m = dict(pre.config.get("masking", {}))
  return ml_collections.ConfigDict({"mode": m.get("mode", "uniform"),
                                    "ratio": float(m.get("ratio", 0.5)),
                                    "forecast_patches": int(m.get("forecast_patches", 1))})


def _build_run(config, task: TaskData, pre: Pretrained, mesh, coords, test) -> _Run:
  model = _model(config, task, pre)
  shardings, step_fn, eval_fn, state = _compiled(
      model, config.train, task.kind, int(config.task.forecast_patches), mesh, config.seed,
      _aux_masking(config, pre))
  if task.kind == "forecast":
    def evaluate(params):
      r = steps.evaluate(eval_fn, params, test, coords, mesh, config.seed)
      return {"mse": r["eval_loss"], "r2": r["eval_r2"]}
  else:
    def evaluate(params):
      return score_predictions(task, *predict(eval_fn, params, test, mesh, coords))
  return _Run(state, shardings, step_fn, evaluate, eval_fn)


def _labelled_batches(task: TaskData, pre: Pretrained, config, start: int):
  from brainlm_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel  # (TF)
  t = config.train
  ds = input_pipeline.host_train_dataset(
      task.train, scaler=pre.scaler, global_batch_size=t.batch_size, window=pre.model_cfg.window,
      seed=config.seed, start_step=start, num_steps=t.num_steps)
  for b in ds.as_numpy_iterator():
    if task.kind != "forecast":
      label = task.train_labels[b["recording"]]
      if task.kind == "regression":
        label = ((label - task.y_mean) / task.y_std).astype(np.float32)
      b["label"] = label
    yield b


def _place_pretrained(state, shardings, pre: Pretrained, kind: str):
  """The pretrained params into the fresh state, resharded onto the run's mesh (copies: the
  step donates the state, and `pre` serves more runs)."""
  if kind == "forecast":
    params = pre.params
  else:
    params = dict(state.params)
    params["brainlm"] = {k: pre.params[k] for k in state.params["brainlm"]}
  return state.replace(params=jax.device_put(params, shardings.params, may_alias=False))


def _check_same_run(saved: dict, now: dict, where: str):
  diffs = [k for k in ("init", "model", "pretrained") if saved.get(k) != now.get(k)]
  for k in ("target", "kind", "classes", "train_recordings", "test_recordings"):
    if saved.get("task", {}).get(k) != now["task"].get(k):
      diffs.append(f"task.{k}")
  if diffs:
    raise ValueError(f"{where} holds a fine-tuning checkpoint of a different run (differs in: "
                     f"{', '.join(diffs)}); use a new --workdir or the same config and checkpoint")


def _unprefixed(metrics: dict, prefix: str = _PREFIX) -> dict:
  return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def run_training(config, task: TaskData, pre: Pretrained, workdir: str, *,
                 init: str = "pretrained", stop_at_step: int | None = None,
                 start_params: Any = None, eval_prefix: str = _PREFIX) -> dict:
  """Fine-tunes (or resumes) in `workdir`: the encoder starts from `pre`'s params, or from the
  network's random init when init is 'random' (any other `init` is a label for the checkpoint's
  identity, e.g. 'random-seed-1' for `run.random_init(pre, 1)`); `start_params`: the whole
  params tree to start from instead (head included: LP-FT's second stage). `task.test` is
  evaluated every train.eval_every steps (logged with `eval_prefix`).

  Returns {'final': test metrics, 'step0': test metrics before training, 'trainable_params',
  'finished' (False when stopped early: SIGTERM or stop_at_step), 'steps', 'params', 'run'
  (the compiled functions), 'checkpointer', 'mesh', 'coords'}.
  """
  workdir = storage.resolve(workdir)  # local (made absolute) or gs://
  storage.makedirs(workdir)
  t = config.train
  mesh = sharding.create_mesh(config.mesh)
  coords = None if pre.coords is None else jax.device_put(pre.coords, sharding.replicated(mesh))
  test = test_windows(task, pre, config.data)
  run = _build_run(config, task, pre, mesh, coords, test)
  if start_params is not None:
    fresh = run.state.replace(params=jax.device_put(start_params, run.shardings.params))
  else:
    fresh = (run.state if init == "random" else
             _place_pretrained(run.state, run.shardings, pre, task.kind))
  identity = {"task": task.describe(), "init": init, "model": dataclasses.asdict(pre.model_cfg),
              "pretrained": {"path": pre.path, "step": pre.step}}
  checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  latest, saved = ckpt_lib.latest_readable_meta(checkpointer)
  state, step0 = fresh, None
  if saved is not None:
    _check_same_run(saved.get("identity", {}), identity, checkpointer.directory)
    step0 = {eval_prefix + k: v for k, v in (saved.get("step0") or {}).items()}
    state = ckpt_lib.restore_with_fallback(
        checkpointer, latest, ckpt_lib.abstract_with_shardings(fresh, run.shardings), fresh)
  _, trainable = heads.layer_scales(jax.device_get(state.params), pre.model_cfg.num_layers,
                                    t.layer_decay, t.trainable)
  n_train = heads.count_trainable(trainable, state.params)
  start = int(jax.device_get(state.step))
  logging.info("Fine-tuning %s (%s init): %s of %s parameters trained; mesh %s; steps %d..%d",
               task.target, init, f"{n_train:,}", f"{count_params(state.params):,}",
               dict(mesh.shape), start, t.num_steps)
  config_json = json.loads(config.to_json_best_effort())
  meta = lambda step, first: {  # noqa: E731
      "identity": identity, "config": config_json, "step0": _unprefixed(first, eval_prefix),
      "data": {"seed": config.seed, "next_step": int(step)}}
  result = train_loop(state, run.step_fn, _labelled_batches(task, pre, config, start), coords,
                      mesh=mesh, workdir=workdir, checkpointer=checkpointer, train_cfg=t,
                      meta=meta, evaluate=run.evaluate, eval_prefix=eval_prefix,
                      paths=[r.path for r in task.train], step0=step0,
                      stop_at_step=stop_at_step)
  return {"final": _unprefixed(result.last, eval_prefix),
          "step0": _unprefixed(result.step0, eval_prefix), "trainable_params": n_train,
          "finished": result.finished, "params": result.state.params, "steps": result.step,
          "run": run, "checkpointer": checkpointer, "mesh": mesh, "coords": coords}


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
  try:
    heads.parse_trainable(t.trainable)
  except ValueError as e:
    problems.append(str(e))
  if t.num_steps < 1:
    problems.append(f"train.num_steps={t.num_steps} must be >= 1")
  for pooling in str(config.task.pooling).split(","):
    if pooling not in heads.POOLINGS:
      problems.append(f"task.pooling={config.task.pooling!r}; expected one of {heads.POOLINGS}"
                      " (several, comma-separated, for --config.data.cv site|kfold to choose by"
                      " inner validation)")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def _row(name: str, source: str, dim: int, metrics: dict) -> dict:
  return {"name": name, "source": source, "dim": int(dim),
          "metrics": {m: labels.point(v) for m, v in metrics.items()}}


def format_table(results: dict) -> str:
  """Markdown: one row per model/baseline, best per metric in bold, chance last."""
  return report.metric_table(
      results["rows"], list(METRICS[results["task"]]),
      columns=(("name", "model"), ("source", "init / source"),
               ("dim_text", "trained params or features")),
      chance=results.get("chance"), chance_label="*chance / majority*")


def _markdown(results: dict) -> str:
  head = [f"# Fine-tuning: `{results['target']}` ({results['task']})", "",
          f"- pretrained checkpoint: `{results['checkpoint']['path']}` (step "
          f"{results['checkpoint']['step']}); data `{results['data']}`",
          f"- split: {results['scheme']}",
          f"- {results['n_train_recordings']} training / {results['n_test_recordings']} test "
          f"recordings, {results['n_test_windows']} test windows; metrics per {results['unit']}",
          f"- {results['steps']} steps; every row is from this run, on the same test data"]
  return "\n".join(head) + "\n\n" + format_table(results) + "\n"


class Finetune(Evaluator):
  """`brainlm-finetune`: the fine-tuning job of `config` (configs/finetune.py), in a workdir.

  `run(pre, workdir)` trains (or resumes) the main run and the random-init baseline and writes
  the report; it returns {'finished': False, 'steps'} when stopped early (SIGTERM or
  `stop_at_step`: run it again to resume).
  """
  name = "finetune"
  auto_split = "all"

  def __init__(self, config: ml_collections.ConfigDict, *, stop_at_step: int | None = None,
               **kw):
    super().__init__(data=config.data.path or None, split=config.data.get("split", "auto"),
                     **kw)
    validate_config(config, jax.device_count())
    self.config, self.stop_at_step = config, stop_at_step

  def run(self, pre: Pretrained, out_dir: str) -> dict:
    config, workdir = self.config, storage.resolve(out_dir)
    sel = self.select(pre)
    task = prepare_task(config, pre, sel.recordings)
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    logging.info("Task %s (%s): %d train / %d test recordings; %s", task.target, task.kind,
                 len(task.train), len(task.test), task.scheme)
    main = run_training(config, task, pre, workdir, stop_at_step=self.stop_at_step)
    if not main["finished"]:
      return {"finished": False, "steps": main["steps"]}
    kind = task.kind
    rows = [_row("fine-tuned", "pretrained", main["trainable_params"], main["final"])]
    if kind == "forecast":
      rows.append(_row("before fine-tuning", "pretrained", 0, main["step0"]))
    if config.baselines.random_init:
      rand = run_training(config, task, pre, storage.join(workdir, "random_init"), init="random")
      if not rand["finished"]:  # stopped (SIGTERM): no report with a half-trained baseline
        return {"finished": False, "steps": rand["steps"]}
      rows.append(_row("fine-tuned", "random-init", rand["trainable_params"], rand["final"]))
    chance = {}
    test = test_windows(task, pre, config.data)
    if kind == "forecast":
      rows += forecast_baselines(test, pre.model_cfg, config.task.forecast_patches)
    else:
      if config.baselines.fc:
        fc = fc_baseline(task, pre, test, config.seed)
        rows.append(_row("fc linear probe", "fc", fc["dim"], fc["metrics"]))
      if task.unit == "subject":  # one label per test subject
        y = np.asarray(list({r.subject: l for r, l in zip(task.test, task.test_labels)}.values()))
      else:
        y = np.concatenate([task.test_labels[b.recording[:b.n]] for b in test])
      if kind == "classification":
        chance = labels.chance("classification", np.asarray(task.classes, object)[y],
                               list(task.classes))
      else:
        chance = labels.chance("regression", y.astype(np.float64), [])
    for r in rows:
      r["dim_text"] = f"{r['dim']:,}"
    results = {
        "target": task.target, "task": kind, "main_metric": MAIN_METRIC[kind],
        "scheme": task.scheme, "unit": task.unit, **sel.describe(pre),
        "n_train_recordings": len(task.train), "n_test_recordings": len(task.test),
        "n_test_windows": int(sum(b.n for b in test)),
        "train_subjects": sorted({r.subject for r in task.train}),
        "test_subjects": sorted({r.subject for r in task.test}),
        "classes": task.classes, "chance": chance, "rows": rows, "steps": main["steps"],
        "options": {k: config.train[k] for k in ("num_steps", "batch_size", "learning_rate",
                                                 "layer_decay", "trainable")},
        "finished": True,
    }
    results["pretraining_overlap"] = {
        "train": len(set(results["test_subjects"]) & set(pre.subjects.get("train", []))),
        "validation": len(set(results["test_subjects"]) & set(pre.subjects.get("validation", [])))}
    results = report.jsonable(results)
    results["report"] = report.write_report(results, workdir, "finetune", _markdown(results))
    return results

  def summary(self, results: dict) -> dict[str, float]:
    if not results.get("finished"):
      return {}
    m = results["main_metric"]
    return {f"{r['name']} ({r['source']})/{m}": r["metrics"][m]["mean"] for r in results["rows"]}

  def describe(self, results: dict) -> str:
    return (f"{results['target']} ({results['task']}): {results['scheme']}\n\n"
            f"{format_table(results)}")


def finetune(config: ml_collections.ConfigDict, checkpoint: str, workdir: str, *,
             stop_at_step: int | None = None, subject_pattern: str | None = None) -> dict:
  """Restore -> task -> fine-tune (and the random-init baseline) -> baselines -> report.
  `subject_pattern`: regex whose first group is the subject id (default: the checkpoint's)."""
  job = Finetune(config, stop_at_step=stop_at_step, subject_pattern=subject_pattern)
  return job.run(restore_pretrained(checkpoint, config.model), workdir)
