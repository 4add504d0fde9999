"""Fine-tuning strategies: what each one trains, phase after phase (transfer/finetune_cv.py).

  phases = strategy_phases(config, "lp-ft")   # [(run name, [(variant, config), ...]), ...]

  linear   the frozen encoder and a linear head (train.lp_steps; each of train.lp_learning_rate's
           rates is a variant, validation keeps one)
  full     every parameter, layer-wise lr decay (train.layer_decay), the task.head_hidden head
  lp-ft    linear's fold model, then every parameter from it with a linear head
  top      the last train.partial_layers blocks, the final LayerNorm and the head
  bottom   the embeddings and the first train.partial_layers blocks (+ final LayerNorm, head)
  aux-mae  full + task.aux_mae_weight x the masked-reconstruction loss
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

STRATEGIES = ("linear", "full", "lp-ft", "top", "bottom", "aux-mae")


def strategy_phases(config: ml_collections.ConfigDict, name: str
                    ) -> list[tuple[str, list[tuple[str, Any]]]]:
  """[(run name, [(variant, config), ...])] of strategy `name`: phases trained one after the
  other, each from the one before's fold model; a phase's variants (the linear head's learning
  rates, train.lp_learning_rate) are candidates its validation chooses between."""
  t = config.train

  def derive(**updates):
    c = copy.deepcopy(config)
    with c.unlocked():
      for key, value in updates.items():
        section, field = key.split("__")
        c[section][field] = value
    return c

  rates = [r for r in str(t.lp_learning_rate).split(",") if r.strip()]
  try:
    rates = [float(r) for r in rates]
  except ValueError:
    raise ValueError(f"train.lp_learning_rate={t.lp_learning_rate!r}; expected a learning rate "
                     "or several, comma-separated (chosen per fold by validation)") from None
  linear = [(f"lr{r:g}" if len(rates) > 1 else "",
             derive(train__trainable="head", task__head_hidden=0, train__num_steps=t.lp_steps,
                    train__learning_rate=r, train__layer_decay=1.0)) for r in rates]
  k = int(t.partial_layers)
  one = lambda **kw: [("", derive(**kw))]  # noqa: E731
  phases = {
      "linear": [("linear", linear)],
      "full": [("full", one(train__trainable="all"))],
      "lp-ft": [("linear", linear), ("lp-ft", one(train__trainable="all", task__head_hidden=0))],
      "top": [("top", one(train__trainable=f"top:{k}"))],
      "bottom": [("bottom", one(train__trainable=f"bottom:{k}"))],
      "aux-mae": [("aux-mae", one(train__trainable="all",
                                  train__aux_mae_weight=float(config.task.aux_mae_weight)))],
  }
  if name not in phases:
    raise ValueError(f"task.strategies: unknown strategy {name!r}; choose from "
                     f"{', '.join(STRATEGIES)}")
  return phases[name]
