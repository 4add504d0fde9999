"""The training input pipeline (tf.data): random windows and their masks, stateless in the step.

`train_dataset` is an infinite (or ``num_steps``-long) pipeline of random windows whose batch for
step ``s`` is a pure function of ``(seed, s)`` (each host takes its slice): resuming at
``start_step`` reproduces an uninterrupted run exactly. Evaluation windows (every window of
every recording, in order) are `windows.iter_windows`'s, without TensorFlow.

Arrays follow the recording convention ``[time, parcels]`` on input; batches are
``{'signal': [batch, parcels, window], 'live': [batch, parcels]}`` (the model's orientation;
`live` is 0 for the constant, "dead", parcels of a window's recording, which the loss leaves
out).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import tensorflow as tf

from brainlm_jax.data.readers import Recording
from brainlm_jax.data.scaling import RobustScaler, signal_of
from brainlm_jax.data.windows import live_parcels
from brainlm_jax.models import masking as masking_lib

try:  # TF is only used for input processing: keep it off the accelerators.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised / unavailable.
  pass

__all__ = ["masks_tf", "train_dataset"]

_RNG_ALG = "philox"  # Fixed (not auto_select) so batches do not depend on the device.
_INT64_MAX = np.iinfo(np.int64).max


def _scaled(recordings: Sequence[Recording | np.ndarray], scaler: RobustScaler | None,
            window: int, what: str) -> tuple[list[np.ndarray], np.ndarray]:
  """The scaled signals [time, parcels] and live float32 [recordings, parcels] (0 = dead)."""
  if not recordings:
    raise ValueError(f"{what}: no recordings")
  if int(window) < 1:
    raise ValueError(f"{what}: window must be >= 1, got {window}")
  signals, live = [], []
  for i, r in enumerate(recordings):
    s = signal_of(r)
    if s.shape[0] < window:
      name = r.path if isinstance(r, Recording) else f"recording {i}"
      raise ValueError(f"{what}: {name} has {s.shape[0]} timepoints < window={window}")
    name = r.path if isinstance(r, Recording) else f"recording {i}"
    live.append(live_parcels(s))
    signals.append(np.asarray(s if scaler is None else scaler.transform(s, name), np.float32))
  parcels = {s.shape[1] for s in signals}
  if len(parcels) != 1:
    raise ValueError(f"{what}: recordings have different parcel counts {sorted(parcels)}")
  return signals, np.stack(live)


def masks_tf(key: tf.Tensor, batch: int, parcels: int, patches: int, *, mode: str,
             ratio: float, forecast_patches: int = 1) -> dict[str, tf.Tensor]:
  """`masking.make_masking` in TF ops, for masks drawn in the input pipeline.

  Returns ``{'ids_keep': int32 [batch, visible] ascending flat token ids,
  'mask': float32 [batch, parcels, patches] (1 = masked)}``; the visible
  count per mode is `masking.num_visible`'s.
  """
  keep = masking_lib.num_visible(mode, parcels, patches, ratio, forecast_patches)
  n = parcels * patches
  if mode == "parcel":  # the same number of visible patches in every parcel
    noise = tf.random.stateless_uniform([batch, parcels, patches], seed=key, alg=_RNG_ALG)
    order = tf.argsort(noise, axis=-1)[..., :keep // parcels]
    ids = tf.reshape(order + (tf.range(parcels) * patches)[None, :, None], [batch, keep])
  elif mode == "uniform":
    noise = tf.random.stateless_uniform([batch, n], seed=key, alg=_RNG_ALG)
    ids = tf.argsort(noise, axis=-1)[:, :keep]
  else:  # forecast: the first patches - forecast_patches of every parcel are visible
    k = patches - forecast_patches
    ids = tf.reshape(tf.range(parcels)[:, None] * patches + tf.range(k)[None, :], [1, keep])
    ids = tf.tile(ids, [batch, 1])
  ids_keep = tf.sort(tf.cast(ids, tf.int32), axis=-1)
  rows = tf.broadcast_to(tf.range(batch)[:, None], [batch, keep])
  where = tf.reshape(tf.stack([rows, ids_keep], axis=-1), [batch * keep, 2])
  visible = tf.scatter_nd(where, tf.ones([batch * keep]), [batch, n])  # [batch, n]
  return {"ids_keep": ids_keep, "mask": tf.reshape(1.0 - visible, [batch, parcels, patches])}


def train_dataset(
    recordings: Sequence[Recording | np.ndarray],
    *,
    scaler: RobustScaler | None,
    batch_size: int,
    window: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    with_positions: bool = False,
    masking: dict | None = None,
) -> tf.data.Dataset:
  """Random training windows, stateless in the step.

  Each sample picks a recording with probability proportional to its number
  of window starts (``time - window + 1``) and a uniform start within it --
  equivalently, a uniform draw over all (recording, start) pairs. The draw
  for step ``s`` uses a stateless Philox key derived from
  ``(seed, s)`` only, so:

  * restarting with ``start_step=s`` yields exactly the batches an
    uninterrupted run would see from step ``s``;
  * the global batch (``batch_size * process_count`` samples) depends only on
    ``(seed, s)``; host ``process_index`` gets its rows
    ``[process_index * batch_size, (process_index + 1) * batch_size)``, so
    a run sees the same data on any number of hosts.

  All scaled recordings are held once in one float32 constant (concatenated
  along time, with an offsets table), so the map is pure TF ops (no
  py_function). That array must fit in host memory (checked to work beyond
  2 GB); give each host a subset of recordings for larger datasets. No
  iterator state needs checkpointing: only the step.

  Args:
    recordings: training recordings (or ``[time, parcels]`` arrays), each with
      at least ``window`` timepoints and the same parcel count.
    scaler: fitted scaler applied to each whole recording (None: no scaling).
    batch_size: PER-HOST batch size.
    window: timepoints per sample.
    seed: base seed (int64 range).
    start_step: first step to produce.
    num_steps: number of steps to produce (None: infinite).
    process_index: this host's index, in ``[0, process_count)``.
    process_count: number of hosts.
    with_positions: also yield where each window came from: ``recording``
      (int64 [batch_size], index into ``recordings``) and ``start`` (int64
      [batch_size], first timepoint), so a bad batch can be named.
    masking: draw the token masks here, on the host, instead of in the train
      step: ``{'mode', 'ratio', 'forecast_patches', 'patch_len'}`` (the
      config's masking section plus model.patch_len, and ``window`` when the
      model reads fewer timepoints than a sample holds: the connectivity
      objective's context). Adds ``ids_keep``
      (int32 [batch_size, visible]) and ``mask`` (float32 [batch_size,
      parcels, patches]), as `masking.make_masking` defines them, drawn from
      the same stateless per-step key.

  Returns:
    Dataset of ``{'signal': float32 [batch_size, parcels, window], 'live': float32
    [batch_size, parcels]}`` (0 for the window's recording's constant parcels; plus
    ``recording``/``start`` with ``with_positions``).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if start_step < 0 or (num_steps is not None and num_steps < 0):
    raise ValueError(f"invalid start_step={start_step} / num_steps={num_steps}")
  if not np.iinfo(np.int64).min <= seed <= _INT64_MAX:
    raise ValueError(f"seed {seed} is outside the int64 range")
  signals, live = _scaled(recordings, scaler, window, "train_dataset")
  num_parcels = signals[0].shape[1]

  lengths = np.array([s.shape[0] for s in signals], np.int64)
  num_starts = lengths - window + 1
  first_start = np.concatenate([[0], np.cumsum(num_starts)[:-1]]).astype(np.int64)
  time_offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  total_starts = int(num_starts.sum())

  data = tf.constant(np.concatenate(signals, axis=0))  # [sum(time), parcels]
  first_start_t = tf.constant(first_start)  # [recordings]
  time_offset_t = tf.constant(time_offset)  # [recordings]
  live_t = tf.constant(live)  # [recordings, parcels]
  window_range = tf.range(window, dtype=tf.int64)  # [window]
  base_key = tf.constant([int(seed), 0x5EED], tf.int64)
  process = tf.constant(int(process_index), tf.int64)

  def make_batch(step):
    key = tf.random.experimental.stateless_fold_in(base_key, step, alg=_RNG_ALG)
    key = tf.random.experimental.stateless_fold_in(key, 0, alg=_RNG_ALG)
    flat = tf.random.stateless_uniform(  # Uniform over all (recording, start).
        [batch_size * process_count], seed=key, minval=tf.constant(0, tf.int64),
        maxval=tf.constant(total_starts, tf.int64), dtype=tf.int64, alg=_RNG_ALG)
    flat = flat[process * batch_size:(process + 1) * batch_size]  # this host's rows
    rec = tf.searchsorted(first_start_t, flat, side="right") - 1  # [batch]
    start = tf.gather(time_offset_t, rec) + flat - tf.gather(first_start_t, rec)
    idx = start[:, None] + window_range[None, :]  # [batch, window]
    windows = tf.gather(data, idx)  # [batch, window, parcels]
    signal = tf.transpose(windows, [0, 2, 1])  # [batch, parcels, window]
    signal = tf.ensure_shape(signal, [batch_size, num_parcels, window])
    out = {"signal": signal, "live": tf.ensure_shape(tf.gather(live_t, rec),
                                                     [batch_size, num_parcels])}
    if with_positions:
      out.update(recording=rec, start=flat - tf.gather(first_start_t, rec))
    if masking is not None:
      mask_key = tf.random.experimental.stateless_fold_in(key, 0x3A5C, alg=_RNG_ALG)
      masks = masks_tf(  # drawn for the global batch, so independent of process_count
          mask_key, batch_size * process_count, num_parcels,
          int(masking.get("window") or window) // int(masking["patch_len"]), mode=masking["mode"],
          ratio=masking["ratio"], forecast_patches=masking.get("forecast_patches", 1))
      out.update({k: v[process * batch_size:(process + 1) * batch_size]
                  for k, v in masks.items()})
    return out

  end = _INT64_MAX if num_steps is None else start_step + num_steps
  ds = tf.data.Dataset.range(start_step, end)
  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.prefetch(tf.data.AUTOTUNE)


def host_train_dataset(recordings: Sequence[Recording | np.ndarray], *,
                       scaler: RobustScaler | None, global_batch_size: int, window: int,
                       seed: int, start_step: int, num_steps: int,
                       masking: dict | None = None) -> tf.data.Dataset:
  """This process's share of the training stream from `start_step` to step `num_steps` (its rows
  of each global batch, with each window's recording index and start): what the training loop
  of pretraining and fine-tuning reads."""
  return train_dataset(
      recordings, scaler=scaler, batch_size=global_batch_size // jax.process_count(),
      window=window, seed=seed, start_step=start_step, num_steps=num_steps - start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      with_positions=True, masking=masking)
