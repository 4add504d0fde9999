"""The pretraining job: training of `config`'s objective (`train.objective`: 'mae', masked
reconstruction, or 'conn', connectivity: models/objectives.py) in a workdir (resumes there).

  train_and_evaluate(config, workdir) -> last metrics

Reads the data (`run_data.prepare_data`: recordings split by subject, the scaler fitted on the
training subjects, or a prepared TFDS dataset's), builds the state on the mesh, restores the
newest readable checkpoint (`checkpoint.restore_with_fallback`), compiles the train step and
refuses to start (memory.OutOfMemory, one line naming a batch that fits) if XLA's memory
analysis says it cannot fit the device, and runs `loop.train_loop` with
the objective's evaluation on the validation subjects' windows. Hooks (e.g. the evaluators
a config lists, wired by `brainlm-pretrain`) run at their own interval on the current params.
WORKDIR gets checkpoints/, metrics.jsonl, tensorboard/, data_report.json, normalization.json and
config.json. It is a local path or a bucket (gs://bucket/run: `storage`, etils.epath; Orbax and
the TensorBoard writer take the same URI), with no FUSE mount.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from brainlm_jax.data import datasets
from brainlm_jax.data import run_data
from brainlm_jax.data.windows import iter_windows
from brainlm_jax.models import build_model
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import count_params
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import memory
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.training import steps
from brainlm_jax.training import storage
from brainlm_jax.training.loop import Hook, train_loop


def check_resume_config(saved: dict, config: ml_collections.ConfigDict):
  """A resumed run must have the same model, masking and data windowing as the saved one."""
  now = json.loads(config.to_json_best_effort())
  diffs = []
  for section in ("model", "masking"):
    for k, v in saved.get(section, {}).items():
      if now.get(section, {}).get(k) != v:
        diffs.append(f"{section}.{k}: checkpoint {v!r} vs now {now.get(section, {}).get(k)!r}")
  if saved.get("data", {}).get("window") != now["data"]["window"]:
    diffs.append(f"data.window: checkpoint {saved['data'].get('window')} vs now "
                 f"{now['data']['window']}")
  for key, default in (("objective", "mae"), ("mae_weight", 0.0), ("target_window", 0),
                       ("conn_kind", "deviation")):
    was, is_ = saved.get("train", {}).get(key, default), now["train"].get(key, default)
    if was != is_:
      diffs.append(f"train.{key}: checkpoint {was!r} vs now {is_!r}")
  if diffs:
    raise ValueError("The workdir holds a checkpoint of a different run; use a new --workdir or "
                     "the same config. Differences:\n  " + "\n  ".join(diffs))


def _write_run_files(workdir: str, config, data: run_data.RunData):
  storage.write_text(storage.join(workdir, "data_report.json"),
                     json.dumps(data.report(), indent=1))
  for s in data.skipped:
    logging.warning("Skipped %s: %s", s["path"], s["reason"])
  data.scaler.save(storage.join(workdir, "normalization.json"))
  storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=1))


def _log_masking(m: ml_collections.ConfigDict, mcfg) -> None:
  """One line with what the masking really masks; a warning when that is far from the ratio asked
  (`parcel` mode rounds each parcel's keep count down, as BrainLM's random_masking_4D)."""
  grid = (mcfg.num_parcels, mcfg.num_patches)
  masked = masking_lib.effective_ratio(m.mode, *grid, m.ratio, m.forecast_patches)
  logging.info("Masking %s (ratio %.2f): %.3f of the %d tokens of a sample masked", m.mode,
               m.ratio, masked, grid[0] * grid[1])
  if m.mode == "parcel" and abs(masked - m.ratio) > 0.05:
    logging.warning("masking.mode=parcel with %d patches per parcel masks %.3f of the tokens, not "
                    "masking.ratio=%.2f (each parcel's keep count is rounded down); "
                    "masking.mode=uniform (BrainLM's) masks the ratio asked", grid[1], masked,
                    m.ratio)


def _compiled_step(step_fn, abstract_state, element_spec: dict, coords, mesh, batch_size: int):
  """`step_fn` compiled for the pipeline's batches, after checking that it fits the devices'
  memory (XLA's memory analysis; memory.OutOfMemory names a batch that fits)."""
  batch = {k: jax.ShapeDtypeStruct((batch_size,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype,
                                   sharding=sharding.batch_sharding(mesh, len(v.shape)))
           for k, v in element_spec.items() if k not in ("recording", "start")}
  with sharding.use_mesh(mesh):
    compiled = step_fn.lower(abstract_state, batch, coords).compile()
  memory.check_fits(compiled, batch_size, what=f"the train step at batch {batch_size}",
                    state_bytes=memory.tree_bytes(abstract_state),
                    divisor=sharding.batch_divisor(mesh))
  return compiled


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None,
                       hooks: Sequence[Hook] = ()) -> dict[str, float]:
  """Runs (or resumes) pretraining in `workdir`. Returns the last logged metrics.

  `stop_at_step` ends this invocation early (after checkpointing), as a preemption would; the
  schedule still runs to `train.num_steps`, and a later call resumes exactly where it stopped.
  """
  workdir = storage.resolve(workdir)  # absolute if local; a gs:// URI as given
  storage.makedirs(workdir)
  state_lib.validate_config(config, jax.device_count())
  mesh = sharding.create_mesh(config.mesh)
  t = config.train
  checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  latest, saved_meta = ckpt_lib.latest_readable_meta(checkpointer)
  if saved_meta is not None:
    check_resume_config(saved_meta["config"], config)
  sample = state_lib.sample_window(config)  # the model's window (+ 'conn': the target's)
  data = run_data.prepare_data(config, saved_meta["scaler"] if saved_meta else None,
                               window=sample)
  if jax.process_index() == 0:
    _write_run_files(workdir, config, data)

  mcfg = state_lib.model_config(config, data.train[0].num_parcels, data.coords is not None)
  model = build_model(mcfg)
  tx = state_lib.make_optimizer(t)
  state, shardings = state_lib.create_train_state(mcfg, tx, mesh, config.seed, model)
  logging.info("Model: %s parameters, %d parcels x %d patches; mesh %s",
               f"{count_params(state.params):,}", mcfg.num_parcels, mcfg.num_patches,
               dict(mesh.shape))
  _log_masking(config.masking, mcfg)
  abstract = ckpt_lib.abstract_with_shardings(state, shardings)
  if latest is not None:
    state = ckpt_lib.restore_with_fallback(checkpointer, latest, abstract, state)
  start = int(jax.device_get(state.step))

  coords = None if data.coords is None else jax.device_put(data.coords, sharding.replicated(mesh))
  from brainlm_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel  # (TensorFlow)
  ds = input_pipeline.host_train_dataset(
      data.train, scaler=data.scaler, global_batch_size=t.batch_size, window=sample,
      seed=config.seed, start_step=start, num_steps=t.num_steps,
      masking=({**config.masking.to_dict(), "patch_len": config.model.patch_len,
                "window": config.data.window}
               if config.masking.get("in_pipeline", False) else None))
  step_fn = _compiled_step(steps.make_train_step(model, tx, config, mesh, shardings), abstract,
                           ds.element_spec, coords, mesh, t.batch_size)
  evaluate = None
  if data.val:
    eval_batches = list(iter_windows(
        data.val, data.scaler, window=sample, batch_size=t.eval_batch_size,
        stride=config.data.eval_stride or None,
        per_recording=config.data.get("eval_windows_per_recording") or None, seed=config.seed,
        max_windows=config.data.get("max_eval_windows") or None))
    logging.info("Evaluation: %d windows of %d validation recordings (%d subjects)",
                 sum(b.n for b in eval_batches), len(data.val), len({r.subject for r in data.val}))
    eval_fn = steps.make_eval_step(model, config, mesh, shardings.params)
    opts = steps.objective_options(config)
    evaluate = lambda params: steps.evaluate(  # noqa: E731
        eval_fn, params, eval_batches, coords, mesh, config.seed, opts["mae_weight"],
        opts["conn_kind"])
  else:
    logging.warning("No validation recordings (data.val_fraction=0 or a dataset without a "
                    "validation split): training without eval_loss / eval_r2.")
  config_json = json.loads(config.to_json_best_effort())
  objective = {**steps.objective_options(config),
               "target_window": sample - int(config.data.window)}
  subjects = {"train": datasets.subjects_of(data.train),
              "validation": datasets.subjects_of(data.val)}
  meta = lambda step, _: {  # noqa: E731
      "config": config_json, "model": dataclasses.asdict(mcfg),
      "data": {"seed": config.seed, "next_step": int(step)}, "scaler": data.scaler.to_dict(),
      "coords": None if data.coords is None else np.asarray(data.coords).tolist(),
      "subjects": subjects, "objective": objective,
  }
  result = train_loop(state, step_fn, ds.as_numpy_iterator(), coords, mesh=mesh, workdir=workdir,
                      checkpointer=checkpointer, train_cfg=t, meta=meta, evaluate=evaluate,
                      paths=[r.path for r in data.train], hooks=hooks, stop_at_step=stop_at_step)
  return result.last
