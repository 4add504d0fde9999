"""Per-parcel robust scaling, fitted on training recordings and saved with the run (JSON), so
that every later job (probing, fine-tuning, evaluation, conversion) scales its inputs the same
way. NumPy only: restoring or converting a checkpoint never imports TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from brainlm_jax.data.readers import Recording
from brainlm_jax.training import storage

__all__ = ["RobustScaler", "signal_of"]


def signal_of(recording: Recording | np.ndarray) -> np.ndarray:
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
    signals = [signal_of(r) for r in recordings]
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
    signal = signal_of(signal)
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
    """Writes the state as JSON (a local path or a gs:// URI: `training.storage`)."""
    storage.write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "RobustScaler":
    return cls.from_dict(json.loads(storage.read_text(path)))

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
