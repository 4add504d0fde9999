"""Metrics: masked reconstruction statistics and the run's writers (JSONL, TensorBoard, log)."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.training import storage


def masked_sums(pred: jax.Array, target: jax.Array, mask: jax.Array,
                weight: jax.Array | None = None, *, live: jax.Array | None = None,
                per_parcel: bool = False) -> dict[str, jax.Array]:
  """Sufficient statistics for masked MSE and R², summed over a batch.

  pred/target [B, P, T, L]; mask [B, P, T] (1 = masked); weight [B] (0 for padding); live
  [B, P] (0: a constant, dead, parcel of that window's recording: left out).
  Returns sums over masked values: n, sse, sy, syy (float32 scalars; [P] with per_parcel).
  """
  w = mask if weight is None else mask * weight[:, None, None]
  w = w if live is None else w * live[:, :, None]
  w = w[..., None].astype(jnp.float32) * jnp.ones_like(target, jnp.float32)
  y = target.astype(jnp.float32)
  axes = (0, 2, 3) if per_parcel else None
  return {"n": w.sum(axes), "sse": (w * jnp.square(pred - y)).sum(axes),
          "sy": (w * y).sum(axes), "syy": (w * y * y).sum(axes)}


def reduce_sums(sums: Mapping[str, Any]) -> dict[str, Any]:
  """mse and R² (1 - SSE / SS_tot about the mean of the masked values) from `masked_sums`.

  Scalar sums give floats; arrays of sums (e.g. per parcel) give float64 arrays, elementwise
  (R² is NaN where the masked values have no variance)."""
  n = np.maximum(np.asarray(sums["n"], np.float64), 1.0)
  sse = np.asarray(sums["sse"], np.float64)
  ss_tot = np.asarray(sums["syy"], np.float64) - np.asarray(sums["sy"], np.float64) ** 2 / n
  r2 = np.where(ss_tot > 0, 1.0 - sse / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)
  if sse.ndim == 0:
    return {"mse": float(sse / n), "r2": float(r2)}
  return {"mse": sse / n, "r2": r2}


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Writes `WORKDIR/metrics.jsonl` and TensorBoard events; only process 0 writes.

  WORKDIR may be a bucket (gs://, `storage`): each write appends its line and closes the file
  (in a bucket an append rewrites the object), so the file is whole after every write.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      storage.makedirs(workdir)
      self._jsonl = storage.join(workdir, "metrics.jsonl")
      with storage.open_file(self._jsonl, "a"):  # created (or kept) now: a bad path fails here
        pass
      try:  # clu's writer goes through tf.io.gfile: gs:// (and ram://) work as local paths do
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
        self._tb = metric_writers.SummaryWriter(storage.join(workdir, "tensorboard"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard writer unavailable (%s); writing metrics.jsonl only", e)

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    with storage.open_file(self._jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), clean)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


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
    parts += [f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items()]
    parts += [f"{rate * self.batch:.1f} samples/s", f"ETA {_fmt_time(eta)}"]
    self._t0, self._s0 = now, step
    return " | ".join(parts)


def to_host(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
