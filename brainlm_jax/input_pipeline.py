"""Scaling and input pipelines for parcellated fMRI recordings.

* `RobustScaler`: per-parcel robust scaling fitted on training recordings and
  saved with the run (JSON) so probing/fine-tuning reuse the same statistics.
* `train_dataset`: an infinite (or ``num_steps``-long) ``tf.data`` pipeline of
  random windows whose batch for step ``s`` is a pure function of
  ``(seed, s)`` (each host takes its slice) -- resuming at ``start_step`` reproduces an
  uninterrupted run exactly.
* `eval_batches`: every non-overlapping window of every recording, in order,
  as padded NumPy batches with per-example weights.

Arrays follow the recording convention ``[time, parcels]`` on input; batches are
``{'signal': [batch, parcels, window]}`` (the model's orientation).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from brainlm_jax.recordings import Recording

try:  # TF is only used for input processing: keep it off the accelerators.
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised / unavailable.
    pass

__all__ = ["RobustScaler", "eval_batches", "train_dataset"]

_RNG_ALG = "philox"  # Fixed (not auto_select) so batches do not depend on the device.
_INT64_MAX = np.iinfo(np.int64).max


def _signal(recording: Recording | np.ndarray) -> np.ndarray:
    """``[time, parcels]`` array of a Recording or array."""
    signal = recording.signal if isinstance(recording, Recording) else recording
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise ValueError(f"expected a [time, parcels] signal, got shape {signal.shape}")
    return signal


class RobustScaler:
    """Per-parcel robust scaling: ``(x - median) / IQR``.

    With ``center_recordings=True`` (the default) each recording first has its
    own per-parcel median subtracted. Raw BOLD carries an arbitrary,
    scanner-, session- and subject-dependent baseline (about 9000 in the HCP
    files, varying per region and subject) that is several orders of magnitude
    larger than the fluctuations of interest; pooling raw values would make the
    "median"/"IQR" mostly describe baseline differences between subjects, and a
    new subject's offset would map to a large constant after scaling. Removing
    each recording's own median keeps only the within-scan dynamics, and the
    pooled median/IQR then normalise their amplitude per parcel.

    With ``scale_recordings=True`` each recording's centred signal is also
    divided by its own per-parcel IQR. Amplitude units differ between
    scanners and preprocessing pipelines (raw BOLD, percent signal change,
    z-scores): pooling recordings whose fluctuations differ by orders of
    magnitude lets the largest dominate the statistics and leaves the others
    near zero. `transform` logs a warning naming the recording when its
    amplitude is more than `AMPLITUDE_WARN_RATIO` away from what the scaler
    was fitted on, pointing at this option.

    Because of this per-recording step, `transform` must be applied to whole
    recordings (not to individual windows) to match what was fitted.

    Attributes:
      median: float64 ``[parcels]``.
      iqr: float64 ``[parcels]`` (q75 - q25, all > 0).
      center_recordings: whether each recording is median-centred first.
      scale_recordings: whether each recording is divided by its own per-parcel IQR first.
    """

    AMPLITUDE_WARN_RATIO = 10.0

    def __init__(self, median: np.ndarray | None = None, iqr: np.ndarray | None = None,
                 center_recordings: bool = True, scale_recordings: bool = False):
        self.center_recordings = bool(center_recordings)
        self.scale_recordings = bool(scale_recordings)
        self.median = None if median is None else np.asarray(median, np.float64)
        self.iqr = None if iqr is None else np.asarray(iqr, np.float64)
        if (self.median is None) != (self.iqr is None):
            raise ValueError("median and iqr must be given together")
        if self.median is not None:
            if self.median.ndim != 1 or self.median.shape != self.iqr.shape:
                raise ValueError(f"median {self.median.shape} and iqr {self.iqr.shape} must be "
                                 "1-D [parcels] of the same length")
            self._check_iqr(self.iqr)

    @staticmethod
    def _check_iqr(iqr: np.ndarray) -> None:
        bad = np.flatnonzero(~(np.isfinite(iqr) & (iqr > 0)))
        if bad.size:
            raise ValueError(
                f"RobustScaler: interquartile range is {iqr[bad[0]]:g} for parcel index "
                f"{int(bad[0])} ({bad.size} parcel(s) affected: {bad[:10].tolist()}); "
                "such a parcel cannot be scaled (constant or mostly-constant signal)")

    @property
    def fitted(self) -> bool:
        return self.median is not None

    @property
    def num_parcels(self) -> int:
        self._require_fitted()
        return int(self.median.shape[0])

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError("RobustScaler is not fitted; call fit() or load()")

    def _center(self, signal: np.ndarray) -> np.ndarray:
        """The per-recording step: optional median-centring, then optional IQR scaling."""
        x = np.asarray(signal, np.float64)
        if self.center_recordings:
            x = x - np.median(x, axis=0, keepdims=True)
        if self.scale_recordings:
            iqr = _iqr(x)
            # A parcel that is flat in this recording (e.g. outside a partial field of view)
            # stays flat rather than becoming inf/NaN.
            x = x / np.where(np.isfinite(iqr) & (iqr > 0), iqr, 1.0)
        return x

    def fit(self, recordings: Sequence[Recording | np.ndarray],
            center_recordings: bool = True, scale_recordings: bool = False) -> "RobustScaler":
        """Fits per-parcel median and IQR over all timepoints of `recordings`.

        Args:
          recordings: TRAINING recordings (or ``[time, parcels]`` arrays); never
            include validation/test subjects.
          center_recordings: subtract each recording's own per-parcel median first.
          scale_recordings: divide each recording by its own per-parcel IQR first.

        Returns:
          self.
        """
        if not recordings:
            raise ValueError("RobustScaler.fit: no recordings")
        self.center_recordings = bool(center_recordings)
        self.scale_recordings = bool(scale_recordings)
        signals = [_signal(r) for r in recordings]
        parcels = {s.shape[1] for s in signals}
        if len(parcels) != 1:
            raise ValueError(f"RobustScaler.fit: recordings have different parcel counts "
                             f"{sorted(parcels)}")
        centred = [self._center(s).astype(np.float32) for s in signals]
        if not self.scale_recordings:
            _warn_amplitude_spread(recordings, [float(np.median(_iqr(c))) for c in centred])
        pooled = np.concatenate(centred, axis=0)
        q25, q50, q75 = np.percentile(pooled, [25, 50, 75], axis=0).astype(np.float64)
        iqr = q75 - q25
        self._check_iqr(iqr)
        self.median, self.iqr = q50, iqr
        return self

    def transform(self, signal: Recording | np.ndarray, name: str | None = None) -> np.ndarray:
        """Scales one whole recording: float ``[time, parcels]`` -> float32 ``[time, parcels]``.

        Logs a warning (naming `name`, or the Recording's path) when the recording's typical
        amplitude is over `AMPLITUDE_WARN_RATIO` times larger or smaller than the fitted one.
        """
        self._require_fitted()
        if name is None and isinstance(signal, Recording):
            name = signal.path
        signal = _signal(signal)
        if signal.shape[1] != self.num_parcels:
            raise ValueError(f"RobustScaler.transform: {name or 'signal'} has {signal.shape[1]} "
                             f"parcels, scaler was fitted on {self.num_parcels}")
        scaled = (self._center(signal) - self.median) / self.iqr
        ratio = float(np.median(_iqr(scaled)))
        if not (1 / self.AMPLITUDE_WARN_RATIO <= ratio <= self.AMPLITUDE_WARN_RATIO):
            logging.warning(
                "%s: its fluctuations are %.3g times those of the recordings the scaler was "
                "fitted on (median per-parcel IQR after scaling; ~1 expected): different units "
                "or preprocessing? Scaling each recording by its own IQR "
                "(--config.data.scale_recordings=true when pretraining) or --standardize at "
                "`brainlm-prepare parcellate` removes such differences.",
                name or "a recording", ratio)
        return scaled.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        self._require_fitted()
        return {
            "type": "RobustScaler",
            "version": 1,
            "center_recordings": self.center_recordings,
            "scale_recordings": self.scale_recordings,
            "num_parcels": self.num_parcels,
            "median": [float(v) for v in self.median],
            "iqr": [float(v) for v in self.iqr],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "RobustScaler":
        if state.get("type", "RobustScaler") != "RobustScaler":
            raise ValueError(f"not a RobustScaler state: type={state.get('type')!r}")
        try:
            scaler = cls(median=state["median"], iqr=state["iqr"],
                         center_recordings=state.get("center_recordings", True),
                         scale_recordings=state.get("scale_recordings", False))
        except KeyError as e:
            raise ValueError(f"RobustScaler state is missing key {e}") from e
        if "num_parcels" in state and int(state["num_parcels"]) != scaler.num_parcels:
            raise ValueError("RobustScaler state: num_parcels does not match median length")
        return scaler

    def save(self, path: str | os.PathLike) -> None:
        """Writes the state as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RobustScaler":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        if not self.fitted:
            return "RobustScaler(unfitted)"
        return (f"RobustScaler(num_parcels={self.num_parcels}, "
                f"center_recordings={self.center_recordings}, "
                f"scale_recordings={self.scale_recordings})")


def _iqr(x: np.ndarray) -> np.ndarray:
    """Per-parcel interquartile range of ``[time, parcels]`` -> ``[parcels]``."""
    q25, q75 = np.percentile(x, [25, 75], axis=0)
    return q75 - q25


def _warn_amplitude_spread(recordings: Sequence[Recording | np.ndarray],
                           amplitudes: Sequence[float]) -> None:
    """Warns when the training recordings' typical amplitudes span over AMPLITUDE_WARN_RATIO."""
    amps = np.asarray(amplitudes, np.float64)
    ok = np.isfinite(amps) & (amps > 0)
    if ok.sum() < 2:
        return
    lo, hi = int(np.argmin(np.where(ok, amps, np.inf))), int(np.argmax(np.where(ok, amps, -np.inf)))
    if amps[hi] / amps[lo] <= RobustScaler.AMPLITUDE_WARN_RATIO:
        return
    name = lambda i: (recordings[i].path if isinstance(recordings[i], Recording)
                      else f"recording {i}")
    logging.warning(
        "Training recordings differ %.0fx in amplitude (median per-parcel IQR %.3g in %s vs "
        "%.3g in %s): different units or preprocessing? The pooled scaling statistics will be "
        "dominated by the largest; --config.data.scale_recordings=true scales each recording "
        "by its own IQR first.", amps[hi] / amps[lo], amps[hi], name(hi), amps[lo], name(lo))


def _scaled(recordings: Sequence[Recording | np.ndarray], scaler: RobustScaler | None,
            window: int, what: str) -> list[np.ndarray]:
    if not recordings:
        raise ValueError(f"{what}: no recordings")
    if int(window) < 1:
        raise ValueError(f"{what}: window must be >= 1, got {window}")
    signals = []
    for i, r in enumerate(recordings):
        s = _signal(r)
        if s.shape[0] < window:
            name = r.path if isinstance(r, Recording) else f"recording {i}"
            raise ValueError(f"{what}: {name} has {s.shape[0]} timepoints < window={window}")
        name = r.path if isinstance(r, Recording) else f"recording {i}"
        signals.append(np.asarray(s if scaler is None else scaler.transform(s, name), np.float32))
    parcels = {s.shape[1] for s in signals}
    if len(parcels) != 1:
        raise ValueError(f"{what}: recordings have different parcel counts {sorted(parcels)}")
    return signals


def masks_tf(key: tf.Tensor, batch: int, parcels: int, patches: int, *, mode: str,
             ratio: float, forecast_patches: int = 1) -> dict[str, tf.Tensor]:
    """`masking.make_masking` in TF ops, for masks drawn in the input pipeline.

    Returns ``{'ids_keep': int32 [batch, visible] ascending flat token ids,
    'mask': float32 [batch, parcels, patches] (1 = masked)}``; the visible
    count per mode is `masking.num_visible`'s.
    """
    from brainlm_jax import masking as masking_lib  # pylint: disable=import-outside-toplevel
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
        config's masking section plus model.patch_len). Adds ``ids_keep``
        (int32 [batch_size, visible]) and ``mask`` (float32 [batch_size,
        parcels, patches]), as `masking.make_masking` defines them, drawn from
        the same stateless per-step key.

    Returns:
      Dataset of ``{'signal': float32 [batch_size, parcels, window]}`` (plus
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
    signals = _scaled(recordings, scaler, window, "train_dataset")
    num_parcels = signals[0].shape[1]

    lengths = np.array([s.shape[0] for s in signals], np.int64)
    num_starts = lengths - window + 1
    first_start = np.concatenate([[0], np.cumsum(num_starts)[:-1]]).astype(np.int64)
    time_offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total_starts = int(num_starts.sum())

    data = tf.constant(np.concatenate(signals, axis=0))  # [sum(time), parcels]
    first_start_t = tf.constant(first_start)  # [recordings]
    time_offset_t = tf.constant(time_offset)  # [recordings]
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
        out = {"signal": signal}
        if with_positions:
            out.update(recording=rec, start=flat - tf.gather(first_start_t, rec))
        if masking is not None:
            mask_key = tf.random.experimental.stateless_fold_in(key, 0x3A5C, alg=_RNG_ALG)
            masks = masks_tf(  # drawn for the global batch, so independent of process_count
                mask_key, batch_size * process_count, num_parcels,
                window // int(masking["patch_len"]), mode=masking["mode"],
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


def eval_batches(
    recordings: Sequence[Recording | np.ndarray],
    *,
    scaler: RobustScaler | None,
    batch_size: int,
    window: int,
    stride: int | None = None,
    max_windows: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation windows as padded NumPy batches.

    Windows start at ``0, stride, 2*stride, ...`` (``stride`` defaults to
    ``window``: non-overlapping) while they fit, recording by recording in the
    given order, truncated to the first ``max_windows`` windows if given.

    Returns:
      List of ``{'signal': float32 [batch_size, parcels, window],
      'weight': float32 [batch_size]}``; weight is 1 for real windows and 0 for
      the zero padding of the last batch.
    """
    stride = window if stride is None else int(stride)
    if batch_size < 1 or stride < 1:
        raise ValueError(f"batch_size ({batch_size}) and stride ({stride}) must be >= 1")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    signals = _scaled(recordings, scaler, window, "eval_batches")
    num_parcels = signals[0].shape[1]

    windows = []  # Each [parcels, window].
    for s in signals:
        for t in range(0, s.shape[0] - window + 1, stride):
            if max_windows is not None and len(windows) >= max_windows:
                break
            windows.append(s[t:t + window].T)
    batches = []
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        signal = np.zeros((batch_size, num_parcels, window), np.float32)
        signal[:len(chunk)] = np.stack(chunk)
        weight = np.zeros((batch_size,), np.float32)
        weight[:len(chunk)] = 1.0
        batches.append({"signal": signal, "weight": weight})
    return batches
