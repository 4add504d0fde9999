"""Transfer jobs by name, in the spirit of big_vision's evaluators.

  job = get("probe")(target="subject-id")        the class behind each CLI
  job = build({"type": "evaluate", "mode": "forecast"})
  results = job.run(pre, out_dir)

  probe      linear probes of the encoder vs random-init and FC (`probe.Probe`)
  evaluate   masked reconstruction / forecasting vs baselines (`evaluate.Evaluate`)
  visualize  reconstructions, per-parcel R², CLS attention, embeddings (`visualize.Visualize`)
  finetune   fine-tuning with baselines (`finetune.Finetune`, options: config=ConfigDict)
  finetune_cv  fine-tuning under leave-site-out / k-fold, strategies x inits x seeds, baselines
             and paired tests (`finetune_cv.FinetuneCV`, options: config=ConfigDict)

A pretraining config may list evaluators to run on the current params while it trains:

  config.evals.sid = dict(type="probe", every=500, target="subject-id")

`brainlm-pretrain` turns them into loop hooks (`pretraining_hooks`): each writes
WORKDIR/evals/NAME/step_N/ and logs its `summary` scores as NAME/... metrics.
"""

from __future__ import annotations

from typing import Any, Mapping

from absl import logging
import jax

from brainlm_jax.training import storage
from brainlm_jax.training.loop import Hook
from brainlm_jax.transfer.evaluate import Evaluate
from brainlm_jax.transfer.finetune import Finetune
from brainlm_jax.transfer.finetune_cv import FinetuneCV
from brainlm_jax.transfer.probe import Probe
from brainlm_jax.transfer.run import Evaluator, from_meta
from brainlm_jax.transfer.visualize import Visualize

REGISTRY: dict[str, type[Evaluator]] = {
    cls.name: cls for cls in (Probe, Evaluate, Visualize, Finetune, FinetuneCV)}


def get(name: str) -> type[Evaluator]:
  if name not in REGISTRY:
    raise ValueError(f"unknown evaluator {name!r}; known: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name]


def build(spec: Mapping[str, Any]) -> Evaluator:
  """An evaluator from {'type': NAME, option: value, ...} ('every' is the hook's, not passed)."""
  options = dict(spec.items() if hasattr(spec, "items") else spec)
  name = options.pop("type", None)
  if not name:
    raise ValueError(f"evaluator spec {options} has no 'type' (one of {sorted(REGISTRY)})")
  options.pop("every", None)
  try:
    return get(name)(**options)
  except TypeError as e:  # an option the evaluator does not take
    raise ValueError(f"evaluator {name!r}: {e}") from e


def _host_params(params: Any) -> Any:
  """The params as host arrays on every process (a collective when there are several)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def pretraining_hooks(evals: Mapping[str, Mapping[str, Any]], workdir: str) -> list[Hook]:
  """Loop hooks running each evaluator of a config's `evals` section every `every` steps on the
  current params (built first, so a bad option fails before training starts)."""
  hooks = []
  for name, spec in evals.items():
    every = int(spec.get("every", 0) or 0)
    if every < 1:
      raise ValueError(f"evals.{name}.every={every}: set how often it runs (steps, >= 1)")
    job = build(spec)

    def fn(step, params, meta, job=job, name=name):
      params = jax.device_put(_host_params(params), jax.local_devices()[0])
      if jax.process_index() != 0:
        return {}
      path = storage.join(storage.resolve(workdir), "checkpoints", str(step))
      results = job.run(from_meta(meta, params, step, path),
                        storage.join(workdir, "evals", name, f"step_{step}"))
      scores = job.summary(results)
      logging.info("evaluator %s at step %d: %s", name, step,
                   ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
      return scores

    hooks.append(Hook(name, every, fn))
  return hooks
