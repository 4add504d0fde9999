"""The one training loop, shared by pretraining and fine-tuning.

  result = train_loop(state, step_fn, batches, coords, mesh=..., workdir=..., checkpointer=...,
                      train_cfg=config.train, meta=lambda step, step0: {...},
                      evaluate=lambda params: {...}, hooks=[Hook(...)])

What it does for every job: runs `step_fn` on each batch (inside `sharding.use_mesh`); logs
step lines (loss, throughput, ETA) and writes metrics.jsonl + TensorBoard at `log_every`;
calls `evaluate(params)` at step 0 (a fresh run), every `eval_every` steps and at the end, and
each hook at its own interval; checkpoints every `checkpoint_every` steps, at the end and
when stopped; watches the steps' non-finite flags (checked only at log/save steps: no per-step
host sync) and names the windows of a bad batch; turns SIGTERM into "finish this step, save,
return" (the caller exits 0 and the same command resumes, bit for bit).

`batches` yields host-local numpy dicts for `steps.to_global`; 'recording' and 'start' keys
(positions of the windows, from `input_pipeline.train_dataset(with_positions=True)`) are
removed before the step and only used to name a bad batch.
"""

from __future__ import annotations

import dataclasses
import os
import signal as signal_lib
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import jax

from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.training import sharding
from brainlm_jax.training.steps import to_global


class NonFiniteError(FloatingPointError):
  """Training stopped on a NaN/inf loss or gradient (train.on_nonfinite='stop')."""


class Preemption:
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


class NonFiniteWatch:
  """Collects each step's on-device non-finite flag and checks them only at log/save steps.

  The step itself never applies a NaN/inf update (params and optimizer state stay as they were,
  `steps.apply_gradients`); this names the steps and the windows of their batches, without a
  host sync per step.
  """

  def __init__(self, action: str, paths: Sequence[str]):
    self.action, self.paths, self.pending, self.total = action, list(paths), [], 0

  def add(self, step: int, flag: jax.Array, position: tuple | None):
    self.pending.append((step, flag, position))

  def _where(self, position) -> str:
    if position is None or position[0] is None:
      return "(positions not recorded)"
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


@dataclasses.dataclass
class Hook:
  """`fn(step, params, meta) -> {metric: value}` run every `every` steps and at the last step
  (meta: what the checkpoint of that step stores); its metrics are logged with `name/` in front
  (e.g. an evaluator listed in a pretraining config)."""
  name: str
  every: int
  fn: Callable[[int, Any, dict], dict]


@dataclasses.dataclass
class LoopResult:
  """last: the last logged metrics; step0: the evaluation before the first step (a fresh run);
  finished: the schedule's last step was reached; stopped: why it returned early (SIGTERM,
  stop_at_step) or None."""
  state: Any
  step: int
  last: dict
  step0: dict
  finished: bool
  stopped: str | None


def _line(step: int, total: int, metrics: dict) -> str:
  return f"step {step}/{total} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train_loop(state, step_fn: Callable, batches: Iterable[dict], coords, *, mesh, workdir: str,
               checkpointer: ckpt_lib.Checkpointer, train_cfg,
               meta: Callable[[int, dict], dict], evaluate: Callable[[Any], dict] | None = None,
               eval_prefix: str = "", paths: Sequence[str] = (), hooks: Sequence[Hook] = (),
               step0: dict | None = None, stop_at_step: int | None = None) -> LoopResult:
  """Runs `step_fn` from the state's step to `train_cfg.num_steps` (see the module docstring).

  Args:
    meta: step, step0 metrics -> the JSON saved with the checkpoint of that step.
    evaluate: params -> metrics (logged with `eval_prefix`).
    paths: the training recordings' files, to name the windows of a non-finite batch.
    step0: the step-0 evaluation of a resumed run (from its checkpoint's meta).
    stop_at_step: end this invocation after that step (checkpointed), as a preemption would.
  """
  t = train_cfg
  start = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(t.num_steps, start, t.batch_size)
  preempt = Preemption()
  watch = NonFiniteWatch(t.get("on_nonfinite", "skip"), paths)
  run_eval = lambda params: {eval_prefix + k: v for k, v in evaluate(params).items()}  # noqa: E731
  step0, last = dict(step0 or {}), {}
  if start == 0 and evaluate is not None:
    step0 = last = run_eval(state.params)
    writer.write(0, step0)
    logging.info(_line(0, t.num_steps, step0))
  step, finished, stopped = start, start >= t.num_steps, None
  try:
    with sharding.use_mesh(mesh):
      for batch in batches:
        position = (batch.pop("recording", None), batch.pop("start", None))
        state, m = step_fn(state, to_global(batch, mesh), coords)
        step += 1
        watch.add(step, m["nonfinite"], position)
        logged = {}
        final = step == t.num_steps
        if preempt.requested:
          stopped = "SIGTERM"
        elif step == stop_at_step and not final:
          stopped = "stop_at_step"
        save = step % t.checkpoint_every == 0 or final or stopped
        if step % t.log_every == 0 or final or save:
          watch.check()  # raises NonFiniteError under on_nonfinite='stop' (nothing is saved)
        if step % t.log_every == 0 or final:
          m = metrics_lib.to_host(m)
          logged = {"train_loss": float(m["train_loss"]), "grad_norm": float(m["grad_norm"]),
                    "skipped_updates": watch.total}
          logged.update({k: float(v) for k, v in m.items()  # the objective's parts
                         if k.endswith("_loss") and k != "train_loss"})
        if evaluate is not None and (step % t.eval_every == 0 or final):
          logged.update(run_eval(state.params))
        for hook in hooks:
          if step % hook.every == 0 or final:
            scores = hook.fn(step, state.params, meta(step, step0))
            logged.update({f"{hook.name}/{k}": v for k, v in scores.items()})
        if logged:
          writer.write(step, logged)
          logging.info(progress.line(step, logged))
          last = logged
        if save:
          checkpointer.save(step, state, meta(step, step0))
        if final:
          finished = True
        if stopped:
          logging.warning("Stopped at step %d (%s); checkpoint saved. Run the same command "
                          "(--workdir %s) to resume", step, stopped, workdir)
          break
  finally:
    checkpointer.close()
    writer.close()
    preempt.restore()
  if finished and start >= t.num_steps and evaluate is not None:  # resumed a finished run
    last = run_eval(state.params)
  return LoopResult(state, step, last, step0, finished, stopped)

