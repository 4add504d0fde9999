"""Metrics: masked reconstruction statistics and the run's writers (JSONL, TensorBoard, log)."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


def masked_sums(pred: jax.Array, target: jax.Array, mask: jax.Array,
                weight: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sufficient statistics for masked MSE and R², summed over a batch.

  pred/target [B, P, T, L]; mask [B, P, T] (1 = masked); weight [B] (0 for padding).
  Returns sums over masked values: n, sse, sy, syy (float32 scalars).
  """
  w = mask if weight is None else mask * weight[:, None, None]
  w = w[..., None].astype(jnp.float32) * jnp.ones_like(target, jnp.float32)
  y = target.astype(jnp.float32)
  return {"n": w.sum(), "sse": (w * jnp.square(pred - y)).sum(),
          "sy": (w * y).sum(), "syy": (w * y * y).sum()}


def reduce_sums(sums: Mapping[str, float]) -> dict[str, float]:
  """mse and R² (1 - SSE / SS_tot about the mean of the masked values) from `masked_sums`."""
  n = max(float(sums["n"]), 1.0)
  ss_tot = float(sums["syy"]) - float(sums["sy"]) ** 2 / n
  mse = float(sums["sse"]) / n
  return {"mse": mse, "r2": 1.0 - float(sums["sse"]) / ss_tot if ss_tot > 0 else float("nan")}


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Writes `WORKDIR/metrics.jsonl` and TensorBoard events; only process 0 writes."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
        self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard writer unavailable (%s); writing metrics.jsonl only", e)

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.write_scalars(int(step), clean)
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Step lines a person can follow: step, loss, samples/s, ETA."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int):
    self.total, self.batch = total_steps, global_batch
    self._t0, self._s0 = time.perf_counter(), start_step

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    now = time.perf_counter()
    done = step - self._s0
    rate = done / max(now - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    parts += [f"{k} {v:.4f}" for k, v in metrics.items()]
    parts += [f"{rate * self.batch:.1f} samples/s", f"ETA {_fmt_time(eta)}"]
    self._t0, self._s0 = now, step
    return " | ".join(parts)


def to_host(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
