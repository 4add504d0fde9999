"""Fine-tuning under cross-validation on a cohort folder: leave-site-out (or stratified k-fold),
a validation split inside every training fold, the strategies the field uses, seeds, controls
and paired tests in one report.

  results = FinetuneCV(config, others=[pre2, pre3]).run(pre, workdir)  # brainlm-finetune --cv site

Per outer fold (`clinical.cohort_folds`: one site, `data.site_folds` groups of whole sites, or
`data.folds` folds by subject) the training fold is split again: whole sites holding about
`data.inner_val_fraction` of its subjects validate (subjects, for kfold). A run, one (strategy,
init, fine-tuning seed, pooling) on one fold, trains on the rest with `finetune.run_training`
(the one training loop: checkpoints, SIGTERM, resume) and is scored on the validation subjects
every train.eval_every steps. The step with the lowest validation loss (early stopping) and,
with several task.pooling, the pooling with the lowest, make the fold's model. Only then is the
test fold read: that model predicts its windows, averaged per subject. No choice sees the test
fold (tests/test_finetune_cv.py plants a leak).

Strategies (task.strategies):
  linear   the frozen encoder and a linear head, trained by AdamW (train.lp_steps at each of
           train.lp_learning_rate's rates, the one with the lowest validation loss kept; no
           gradient flows into the encoder)
  full     every parameter, layer-wise lr decay (train.layer_decay), the task.head_hidden head
  lp-ft    linear's fold model, then every parameter from it with a linear head (Kumar et al.
           2022); its validation may keep linear's model (step 0)
  top      the last train.partial_layers blocks, the final LayerNorm and the head
  bottom   the embeddings and the first train.partial_layers blocks (+ final LayerNorm, head)
  aux-mae  full + task.aux_mae_weight x the masked-reconstruction loss (BrainLM's variant)
Inits: every pretraining run (`pre`, then `others`) and the same network at
baselines.random_seeds random inits (seed s: the init a pretraining run of seed s starts from),
each fine-tuned with train.seeds seeds (data order, head, dropout). Rows: `full` (pretraining
run 1, seed 0), `full@2`, ... (runs x seeds in that order), `random-full`, `random-full@2`, ...
Baselines on the same folds and subjects (`clinical.py`): fc, tangent, site, and chance.
Paired tests (`clinical.paired_runs_test`): each strategy's pretrained runs against its random
inits; the best strategy against fc and tangent. Regression rows get a permutation null of the
pooled Pearson r (labels permuted within test folds).

WORKDIR/runs/<strategy>/<init>/seed<s>/<fold>/<pooling>/ holds a run's metrics.jsonl (its
validation curve), its checkpoints while it trains, then result.json and its fold model's params
(params.msgpack); a finished run is reused when the same command runs again.
WORKDIR/finetune_cv.{json,md} is the report.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Sequence

from absl import logging
import flax.serialization
import jax
import ml_collections
import numpy as np

from brainlm_jax.data import cohort as cohort_lib
from brainlm_jax.data import phenotypes as phen
from brainlm_jax.data.windows import iter_windows
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import storage
from brainlm_jax.transfer import clinical
from brainlm_jax.transfer import finetune as ft
from brainlm_jax.transfer import labels
from brainlm_jax.transfer import report
from brainlm_jax.transfer.features import extract_features, row_name
from brainlm_jax.transfer.finetune_report import format_report, per_site, permutation_p, spread
from brainlm_jax.transfer.run import Evaluator, Pretrained, random_init
from brainlm_jax.transfer.strategies import STRATEGIES, strategy_phases  # noqa: F401  (re-exported)
from brainlm_jax.transfer.tasks import TaskData



@dataclasses.dataclass
class Init:
  """Where a run's encoder starts: pretraining run `index` or random init of seed `index`."""
  pre: Pretrained
  random: bool
  index: int

  @property
  def label(self) -> str:
    return f"random-{self.index}" if self.random else f"pretrained-{self.index + 1}"


def _task(target: str, kind: str, recs, y_of, classes, train_recs=None) -> TaskData:
  """TaskData over subject labels: train = train_recs, test = recs; standardised on train."""
  train_recs = train_recs if train_recs is not None else []
  task = TaskData(target, kind, list(train_recs), list(recs), unit="subject", classes=classes)
  if kind == "classification":
    task.train_labels = np.asarray([classes.index(y_of[r.subject]) for r in train_recs],
                                   np.int64)
    task.test_labels = np.asarray([classes.index(y_of[r.subject]) for r in recs], np.int64)
  else:
    ytr = np.asarray([y_of[r.subject] for r in train_recs], np.float64)
    if len(ytr):
      task.y_mean, task.y_std = float(ytr.mean()), float(ytr.std() or 1.0)
    task.train_labels = ytr
    task.test_labels = np.asarray([y_of[r.subject] for r in recs], np.float64)
  return task


def validation_curve(workdir: str) -> dict[int, float]:
  """{step: validation loss} from a run's metrics.jsonl (the last line of a step wins: a
  resumed run logs the steps after its checkpoint again)."""
  out = {}
  path = storage.join(workdir, "metrics.jsonl")
  if storage.exists(path):
    for line in storage.read_text(path).splitlines():
      row = json.loads(line)
      if "val_loss" in row:
        out[int(row["step"])] = float(row["val_loss"])
  return out


class FinetuneCV(Evaluator):
  """`brainlm-finetune --cv site|kfold`: see the module docstring. stop_at_step: stop the first
  run that trains after that step (as a preemption would; run again to resume)."""
  name = "finetune_cv"
  auto_split = "all"

  def __init__(self, config: ml_collections.ConfigDict, *, others: Sequence[Pretrained] = (),
               stop_at_step: int | None = None, **kw):
    super().__init__(data=config.data.path or None, split=config.data.get("split", "auto"),
                     **kw)
    d, t = config.data, config.task
    if d.cv not in ("site", "kfold"):
      raise ValueError(f"data.cv={d.cv!r}: FinetuneCV is for 'site' or 'kfold'")
    if t.target in ("subject-id", "forecast"):
      raise ValueError(f"--cv {d.cv} fine-tunes a subject-level target (a column of the cohort "
                       f"table), not {t.target!r}")
    if not 0 < d.inner_val_fraction < 0.5:
      raise ValueError(f"data.inner_val_fraction={d.inner_val_fraction} must be in (0, 0.5)")
    self.strategies = [s for s in str(t.strategies).split(",") if s]
    for s in self.strategies:
      strategy_phases(config, s)  # unknown names fail here, before any model work
    for _, variants in [p for s in self.strategies for p in strategy_phases(config, s)]:
      for _, c in variants:
        ft.validate_config(c, jax.device_count())
    self.poolings = [p for p in str(t.pooling).split(",") if p]
    self.subset = _parse_subset(d.subset)
    self.config, self.others, self.stop_at_step = config, list(others), stop_at_step
    self._done = 0

  # -- the cohort ------------------------------------------------------------------------------

  def _cohort(self, pre: Pretrained):
    """(selection, fc features, subjects, y, classes, kind, sites, recs per subject, origin)."""
    c = self.config
    sel = self.select(pre)
    table = None
    if c.data.phenotypes:
      table = phen.read_phenotypes(c.data.phenotypes, c.data.subject_column, c.task.target)
    values, origin = cohort_lib.subject_values(sel.data, sel.recordings, c.task.target, table)
    if self.subset:
      column, wanted = self.subset
      keep, _ = cohort_lib.subject_values(sel.data, sel.recordings, column)
      values = {s: v for s, v in values.items() if keep.get(s) in wanted}
      origin += f", subjects with {column} in {sorted(wanted)}"
      if not values:
        raise ValueError(f"data.subset={c.data.subset!r}: no subject with a {c.task.target!r} "
                         f"value has {column} in {sorted(wanted)}")
    feats = extract_features(pre, sel.recordings, readings=(), random_seeds=(),
                             batch_size=c.data.eval_batch_size)
    subjects, raw, sites, means, recs, _ = clinical.subject_table(feats, sel.recordings, values)
    if len(subjects) < 4:
      raise ValueError(f"only {len(subjects)} subject(s) have a {c.task.target!r} value "
                       f"({origin})")
    kind, y = labels.target_values(c.task.target, raw, subjects.tolist(), c.task.type,
                                   option="--config.task.type")
    classes = labels.sorted_classes(y.tolist()) if kind == "classification" else []
    if kind == "classification" and len(classes) < 2:
      raise ValueError(f"target {c.task.target!r} is constant ({classes}); nothing to predict")
    return sel, means, subjects, y, classes, kind, sites, recs, origin

  # -- one run ---------------------------------------------------------------------------------

  def _run(self, cfg, run_name: str, init: Init, seed: int, fold: str, pooling: str,
           tasks: tuple[TaskData, TaskData], workdir: str, start: str | None = None,
           variant: str = "") -> dict:
    """Trains (or reuses) one run; -> result.json's content (validation curve, chosen step,
    test subjects and their averaged outputs)."""
    wd = storage.join(workdir, "runs", run_name, init.label, f"seed{seed}", fold,
                      pooling + (f"_{variant}" if variant else ""))
    result_path = storage.join(wd, "result.json")
    fit_task, test_task = tasks
    c = copy.deepcopy(cfg)
    with c.unlocked():
      c.seed, c.task.pooling = int(seed), pooling
      c.train.checkpoint_every = c.train.eval_every
      c.train.keep_checkpoints = c.train.num_steps // c.train.eval_every + 2
    identity = _identity(c, init, fit_task, test_task, start)
    if storage.exists(result_path):
      saved = json.loads(storage.read_text(result_path))
      if saved.get("identity") != identity:
        raise ValueError(f"{wd} holds a run of another config, init or split (its "
                         "result.json differs); use a new --workdir, or the same command")
      return saved
    start_params = None
    if start is not None:
      with storage.open_file(storage.join(start, "params.msgpack"), "rb") as f:
        start_params = flax.serialization.msgpack_restore(f.read())
    began = time.perf_counter()
    out = ft.run_training(c, fit_task, init.pre, wd, init=init.label,
                          start_params=start_params, eval_prefix="val_",
                          stop_at_step=self.stop_at_step)
    if not out["finished"]:
      raise _Stopped()
    curve = validation_curve(wd)
    candidates = {s: v for s, v in curve.items() if s > 0 or start is not None}
    best = min(candidates, key=lambda s: (candidates[s], s))
    params = out["params"]
    if best == 0:  # the phase before's model (lp-ft: validation kept the linear head)
      params = start_params
    elif best != out["steps"]:
      ckpt = out["checkpointer"]
      ckpt.wait()
      state, _ = ckpt.restore(best, _abstract_state(out))
      params = state.params
    params = jax.device_get(params)
    run = out["run"]
    batches = list(iter_windows(test_task.test, init.pre.scaler, window=init.pre.model_cfg.window,
                                batch_size=c.data.eval_batch_size))
    logits, rec = ft.predict(run.eval_fn, jax.device_put(params, run.shardings.params), batches,
                             out["mesh"], out["coords"])
    units, _, values = ft.subject_outputs(test_task, logits, rec)
    out["checkpointer"].close()
    with storage.open_file(storage.join(wd, "params.msgpack"), "wb") as f:
      f.write(flax.serialization.msgpack_serialize(params))
    result = {"identity": identity, "run": run_name, "init": init.label, "seed": seed,
              "fold": fold, "variant": variant, "learning_rate": float(c.train.learning_rate),
              "pooling": pooling, "curve": sorted(curve.items()), "chosen_step": int(best),
              "val_loss": candidates[best], "trainable_params": out["trainable_params"],
              "test_subjects": list(units), "values": np.asarray(values).tolist(),
              "seconds": time.perf_counter() - began, "dir": wd}
    storage.write_text(result_path, json.dumps(report.jsonable(result)))
    if storage.is_local(wd):
      shutil.rmtree(os.path.join(wd, "checkpoints"), ignore_errors=True)
    self._done += 1
    return result

  # -- the job ---------------------------------------------------------------------------------

  def run(self, pre: Pretrained, out_dir: str) -> dict:
    c = self.config
    workdir = storage.resolve(out_dir)
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.json"), c.to_json_best_effort(indent=1))
    sel, means, subjects, y, classes, kind, sites, recs, origin = self._cohort(pre)
    splits = clinical.cohort_folds(y, subjects, sites, c.data.cv, c.data.folds, c.seed, kind,
                                   site_folds=c.data.site_folds)
    y_of = dict(zip(subjects.tolist(), y.tolist()))
    recordings = sel.recordings
    rec_of = lambda idx: [recordings[i] for s in subjects[idx] for i in recs[s]]  # noqa: E731
    inits = ([Init(p, False, k) for k, p in enumerate([pre] + self.others)]
             + [Init(random_init(pre, s), True, s) for s in range(c.baselines.random_seeds)])
    seeds = list(range(c.seed, c.seed + int(c.train.seeds)))
    plan = [(s, init, seed, fold) for s in self.strategies for init in inits for seed in seeds
            for fold in range(len(splits))]
    logging.info("Fine-tuning %s (%s, %d subjects) under %s: %d folds x %d strategies x %d "
                 "inits x %d seeds x %d poolings", c.task.target, kind, len(subjects),
                 c.data.cv, len(splits), len(self.strategies), len(inits), len(seeds),
                 len(self.poolings))
    fold_tasks = []
    for tr, te, name in splits:
      fit, val = clinical.inner_split(tr, sites, y, c.data.cv, c.data.inner_val_fraction, c.seed, kind)
      fit_task = _task(c.task.target, kind, rec_of(val), y_of, classes, train_recs=rec_of(fit))
      test_task = _task(c.task.target, kind, rec_of(te), y_of, classes, train_recs=rec_of(fit))
      fold_tasks.append((fit_task, test_task, name, sorted(set(sites[val].tolist()))))
    began, results, trained = time.perf_counter(), collections.defaultdict(dict), 0
    try:
      for i, (strategy, init, seed, f) in enumerate(plan, 1):
        done_before = self._done
        fit_task, test_task, fold_name, _ = fold_tasks[f]
        fold_dir = fold_name.replace("/", "_")
        start = None
        for run_name, variants in strategy_phases(c, strategy):
          candidates = [self._run(cfg, run_name, init, seed, fold_dir, p, (fit_task, test_task),
                                  workdir, start=start, variant=v)
                        for v, cfg in variants for p in self.poolings]
          chosen = min(candidates, key=lambda r: (r["val_loss"], r["dir"]))
          start = chosen["dir"]
        results[strategy, init.label, seed][fold_name] = chosen
        trained += self._done > done_before  # ETA: from the items trained here, not reused
        spent = time.perf_counter() - began
        logging.info("finetune-cv %d/%d: %s %s seed %d fold %s: step %d, val loss %.4f | %.0f s "
                     "| ETA %.0f s", i, len(plan), strategy, init.label, seed, fold_name,
                     chosen["chosen_step"], chosen["val_loss"], spent,
                     spent / max(trained, 1) * (len(plan) - i))
    except _Stopped:
      return {"finished": False, "runs_done": self._done}
    return self._report(pre, sel, workdir, subjects, y, classes, kind, sites, recs, means,
                        splits, fold_tasks, inits, seeds, results, origin,
                        time.perf_counter() - began)

  def _report(self, pre, sel, workdir, subjects, y, classes, kind, sites, recs, means, splits,
              fold_tasks, inits, seeds, results, origin, seconds) -> dict:
    c = self.config
    index = {s: i for i, s in enumerate(subjects.tolist())}
    entries, preds, runs = [], {}, {}
    for strategy in self.strategies:
      for random in (False, True):
        members = [(init, seed) for init in inits if init.random == random for seed in seeds]
        for k, (init, seed) in enumerate(members):
          name = row_name(strategy, random, k)
          pred = np.empty(len(y), object if kind == "classification" else np.float64)
          proba = np.zeros((len(y), len(classes))) if kind == "classification" else None
          chosen = {}
          for fold_name, r in results[strategy, init.label, seed].items():
            at = np.asarray([index[s] for s in r["test_subjects"]])
            values = np.asarray(r["values"])
            if kind == "classification":
              proba[at] = values
              pred[at] = np.asarray(classes, object)[values.argmax(axis=1)]
            else:
              pred[at] = values[:, 0]
            chosen[fold_name] = {"step": r["chosen_step"], "pooling": r["pooling"],
                                 "learning_rate": r.get("learning_rate")}
          e = clinical.pooled_entry(name, y, pred, proba, splits, kind, classes, c.seed,
                                    dim=next(iter(results[strategy, init.label, seed].values()))
                                    ["trainable_params"],
                                    source="random-init" if random else "pretrained")
          e.update(strategy=strategy, init=init.label, seed=seed, chosen=chosen,
                   per_site=per_site(kind, y, pred, proba, classes, sites))
          if kind == "regression":
            e["permutation_p"] = permutation_p(y, pred.astype(np.float64), splits, c.seed)
          entries.append(e)
          preds[name] = pred
          runs.setdefault((strategy, random), []).append(name)
    baselines, base_preds = self._baselines(sel, subjects, y, classes, kind, sites, recs, means,
                                            splits)
    entries += baselines
    preds.update(base_preds)
    main = "accuracy" if kind == "classification" else "r2"
    tests = []
    for strategy in self.strategies:
      a, b = runs.get((strategy, False), []), runs.get((strategy, True), [])
      if a and b:
        tests.append({"a": " + ".join(a), "b": " + ".join(b), **clinical.paired_runs_test(
            kind, y, [preds[n] for n in a], [preds[n] for n in b])})
    score = {s: np.mean([e["metrics"][main]["mean"] for e in entries
                         if e.get("strategy") == s and e["source"] == "pretrained"])
             for s in self.strategies}
    best = max(score, key=score.get)
    for base in ("fc", "tangent"):
      if base in preds:
        tests.append({"a": " + ".join(runs[best, False]), "b": base, **clinical.paired_runs_test(
            kind, y, [preds[n] for n in runs[best, False]], [preds[base]])})
    summary = [{"strategy": s, **{src: spread([e["metrics"][main]["mean"] for e in entries
                                                if e.get("strategy") == s
                                                and e["source"] == src])
                                  for src in ("pretrained", "random-init")}}
               for s in self.strategies]
    results_out = {
        "target": c.task.target, "task": kind, "main_metric": main, "cv": c.data.cv,
        "scheme": (("leave one site out" if not c.data.site_folds else
                    f"leave one of {len(splits)} groups of sites out") if c.data.cv == "site"
                   else f"{len(splits)}-fold stratified by label and site, grouped by subject")
        + "; validation sites inside each training fold choose the step and pooling; window "
          "predictions averaged per subject; pooled test predictions, 95% bootstrap interval "
          "over subjects",
        "labels_from": origin, "n_subjects": len(subjects),
        "folds": [{"name": name, "n_test": int(len(te)), "validation": ft_[3],
                   "n_fit_recordings": len(ft_[0].train), "n_validation_recordings":
                   len(ft_[0].test)} for (_, te, name), ft_ in zip(splits, fold_tasks)],
        "sites": dict(collections.Counter(sites.tolist())), "classes": classes,
        "class_counts": (dict(collections.Counter(y.tolist())) if kind == "classification"
                         else {}),
        "chance": labels.chance(kind, y, classes), "rows": entries, "strategies": summary,
        "best_strategy": best, "paired_tests": tests,
        "inits": [{"label": i.label, "path": i.pre.path, "step": i.pre.step} for i in inits],
        "seeds": seeds, "poolings": self.poolings, "seconds": seconds,
        "run_seconds": {s: sum(r["seconds"] for (st, _, _), fr in results.items() if st == s
                               for r in fr.values()) for s in self.strategies},
        "predictions": {"subjects": subjects.tolist(), "y": y.tolist(),
                        **{n: np.asarray(p).tolist() for n, p in preds.items()}},
        "options": {k: c.train[k] for k in ("num_steps", "batch_size", "learning_rate",
                                            "layer_decay", "lp_steps", "lp_learning_rate",
                                            "eval_every", "partial_layers")},
        **sel.describe(pre), "finished": True,
    }
    results_out = report.jsonable(results_out)
    results_out["report"] = report.write_report(results_out, workdir, "finetune_cv",
                                                format_report(results_out))
    return results_out

  def _baselines(self, sel, subjects, y, classes, kind, sites, recs, means, splits):
    """fc, tangent and site on the same folds and subjects (clinical.py)."""
    rows = {"fc": lambda tr, te: (means["fc"][tr], means["fc"][te])}
    rows.update(clinical.baseline_rows(sel.recordings, subjects, sites, recs,
                                       tangent=bool(self.config.baselines.tangent)))
    return clinical.evaluate_rows(rows, y, splits, kind, classes, self.config.seed,
                                  n_jobs=len(os.sched_getaffinity(0)))

  def summary(self, results: dict) -> dict[str, float]:
    if not results.get("finished"):
      return {}
    m = results["main_metric"]
    return {f"{r['name']}/{m}": r["metrics"][m]["mean"] for r in results["rows"]}

  def describe(self, results: dict) -> str:
    return format_report(results)


class _Stopped(Exception):
  """A run stopped early (SIGTERM, or stop_at_step): the same command resumes."""


def _abstract_state(out: dict):
  """The run's TrainState as ShapeDtypeStructs with its shardings (what a restore needs)."""
  run = out["run"]
  return ckpt_lib.abstract_with_shardings(run.state, run.shardings)


def _identity(c, init: Init, fit: TaskData, test: TaskData, start: str | None) -> str:
  """A digest of what a run's result depends on: its training config, model, init, split."""
  task = {k: v for k, v in c.task.to_dict().items() if k != "strategies"}
  what = {"train": c.train.to_dict(), "model": c.model.to_dict(), "task": task, "seed": c.seed,
          "init": [init.label, init.pre.path, init.pre.step], "start": start,
          "fit": [r.path for r in fit.train], "validation": [r.path for r in fit.test],
          "test": [r.path for r in test.test], "eval_batch_size": c.data.eval_batch_size}
  return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _parse_subset(spec: str) -> tuple[str, set[str]] | None:
  """'COLUMN=V1[|V2...]' -> (column, {values}); '' -> None."""
  if not spec:
    return None
  column, sep, values = str(spec).partition("=")
  if not sep or not column or not values:
    raise ValueError(f"data.subset={spec!r}; expected COLUMN=VALUE (or COLUMN=V1|V2), e.g. "
                     "DX_GROUP=1 for ABIDE's autism group")
  return column, set(values.split("|"))


def finetune_cv(config: ml_collections.ConfigDict, checkpoints: Sequence[str], workdir: str, *,
                stop_at_step: int | None = None, subject_pattern: str | None = None) -> dict:
  """Restore every pretraining run (`checkpoints`: runs of one network, e.g. seeds) -> the
  cross-validated fine-tuning job -> its report."""
  pres = [ft.restore_pretrained(c, config.model) for c in checkpoints]
  for other in pres[1:]:
    if other.model_cfg != pres[0].model_cfg:
      raise ValueError(f"{other.path}: another network than {pres[0].path}'s; the runs compared "
                       "in one fine-tuning report must share the model config")
  job = FinetuneCV(config, others=pres[1:], stop_at_step=stop_at_step,
                   subject_pattern=subject_pattern)
  return job.run(pres[0], workdir)
