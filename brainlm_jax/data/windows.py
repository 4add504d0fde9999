"""Deterministic windows of whole recordings, for evaluation and transfer (NumPy, no TensorFlow).

  for batch in iter_windows(recordings, scaler, window=200, batch_size=16):
    batch.signal   float32 [16, P, 200], zero-padded past batch.n
    batch.weight   float32 [16]: 1 for the batch.n real windows, 0 for padding
    batch.live     float32 [16, P]: 0 for a recording's constant (dead) parcels, kept as missing
    batch.recording, batch.window   int [n]: which recording, which of its windows

The one window iterator: pretraining's validation pass, probing, evaluation, visualisation and
fine-tuning all read their windows here (training windows are `input_pipeline.train_dataset`'s).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence
import zlib

import numpy as np

from brainlm_jax.data.readers import Recording, dead_parcels
from brainlm_jax.data.scaling import RobustScaler

__all__ = ["WindowBatch", "iter_windows", "live_parcels", "spread_starts", "window_starts"]


@dataclasses.dataclass
class WindowBatch:
  """signal float32 [batch_size, P, W] (zero-padded past `n`); recording, window int [n];
  live float32 [batch_size, P]: 1 where the window's recording has signal in the parcel, 0 for
  its constant ("dead") parcels, which the loss, the metrics and FC leave out."""
  signal: np.ndarray
  n: int
  recording: np.ndarray
  window: np.ndarray
  live: np.ndarray

  @property
  def weight(self) -> np.ndarray:
    """float32 [batch_size]: 1 for real windows, 0 for the padding."""
    return (np.arange(len(self.signal)) < self.n).astype(np.float32)


def _signal_of(r: Recording | np.ndarray) -> np.ndarray:
  return r.signal if isinstance(r, Recording) else np.asarray(r)


def live_parcels(signal: np.ndarray) -> np.ndarray:
  """float32 [P] of a ``[time, parcels]`` recording: 0 for its constant (dead) parcels, else 1."""
  live = np.ones(np.shape(signal)[1], np.float32)
  live[dead_parcels(np.asarray(signal))] = 0.0
  return live


def window_starts(num_timepoints: int, window: int, stride: int | None = None,
                  min_windows: int = 1) -> list[int]:
  """First timepoints of the windows of a recording: 0, stride, 2 * stride, ... while they fit
  (stride defaults to the window: non-overlapping). A recording that fits fewer than
  `min_windows` that way (but is longer than one window) gets `min_windows` overlapping windows
  spread evenly from its first to its last timepoint."""
  starts = list(range(0, int(num_timepoints) - window + 1, int(stride or window)))
  last = int(num_timepoints) - window
  if 0 < len(starts) < min_windows and last > 0:
    starts = sorted(set(np.linspace(0, last, min_windows).round().astype(int).tolist()))
  return starts


def spread_starts(starts: Sequence[int], count: int, key: str, seed: int = 0) -> list[int]:
  """`count` of a recording's window `starts` (all when it has no more), drawn without
  replacement from a generator seeded by (`seed`, a hash of `key`: the recording's path), in
  order: the same windows whatever the other recordings are."""
  starts = list(starts)
  if count >= len(starts):
    return starts
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])
  return sorted(np.asarray(starts)[rng.choice(len(starts), count, replace=False)].tolist())


def iter_windows(recordings: Sequence[Recording | np.ndarray], scaler: RobustScaler | None, *,
                 window: int, stride: int | None = None, batch_size: int = 32,
                 max_windows: int | None = None, min_windows: int = 1,
                 per_recording: int | None = None, seed: int = 0) -> Iterator[WindowBatch]:
  """Every window starting at 0, stride, 2*stride, ... (default non-overlapping) of every
  recording in order, each recording scaled whole by `scaler`, in padded batches of a fixed
  size (one compiled shape), up to `max_windows` windows in all; at least `min_windows`
  (overlapping) of a recording longer than one window (`window_starts`); with `per_recording`,
  at most that many of each recording's windows, chosen by `spread_starts(seed)` (evaluation
  windows spread over every recording, not the first ones in file order). `batch.window` is
  the window's index among all of its recording's windows. Only one recording's scaled copy is
  held at a time."""
  stride = int(stride or window)
  if batch_size < 1 or stride < 1 or window < 1:
    raise ValueError(f"batch_size ({batch_size}), window ({window}) and stride ({stride}) must "
                     "be >= 1")
  if per_recording is not None and per_recording < 1:
    raise ValueError(f"per_recording must be >= 1, got {per_recording}")
  if max_windows is not None and max_windows < 1:
    raise ValueError(f"max_windows must be >= 1, got {max_windows}")
  if not len(recordings):
    raise ValueError("iter_windows: no recordings")
  buf_sig, buf_rec, buf_win, buf_live = [], [], [], []
  count = 0

  def flush():
    n = len(buf_sig)
    sig = np.zeros((batch_size,) + buf_sig[0].shape, np.float32)
    sig[:n] = np.stack(buf_sig)
    live = np.zeros(sig.shape[:2], np.float32)
    live[:n] = np.stack(buf_live)
    out = WindowBatch(sig, n, np.asarray(buf_rec, np.int64), np.asarray(buf_win, np.int64), live)
    buf_sig.clear(), buf_rec.clear(), buf_win.clear(), buf_live.clear()
    return out

  for i, r in enumerate(recordings):
    s = _signal_of(r)
    name = r.path if isinstance(r, Recording) else f"recording {i}"
    if s.ndim != 2 or s.shape[0] < window:
      raise ValueError(f"{name}: signal of shape {s.shape} has fewer than window={window} "
                       "timepoints (expected [time, parcels])")
    live = live_parcels(s)
    s = scaler.transform(s, name) if scaler is not None else np.asarray(s, np.float32)
    starts = window_starts(s.shape[0], window, stride, min_windows)
    chosen = set(starts if per_recording is None else
                 spread_starts(starts, per_recording, name, seed))
    for j, t in enumerate(starts):
      if t not in chosen:
        continue
      if max_windows is not None and count >= max_windows:
        break
      buf_sig.append(s[t:t + window].T)
      buf_rec.append(i)
      buf_win.append(j)
      buf_live.append(live)
      count += 1
      if len(buf_sig) == batch_size:
        yield flush()
    if max_windows is not None and count >= max_windows:
      break
  if buf_sig:
    yield flush()
