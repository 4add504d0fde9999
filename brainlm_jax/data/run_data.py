"""What a pretraining run reads: its training and validation recordings (split by subject), the
scaler fitted on the training subjects (or restored), coordinates, and every skipped file.

  data = prepare_data(config) -> RunData     config.data.path: recordings or a TFDS dataset

Finding recordings, subject ids and splits are `datasets.py`'s; the TFDS reader is
`tfds_source.py`'s (imported only for a TFDS dataset: TensorFlow).
"""

from __future__ import annotations

import dataclasses

from absl import logging
import ml_collections
import numpy as np

from brainlm_jax.data import readers
from brainlm_jax.data.datasets import (drop_short, load_recordings, prepared_dataset,
                                       recording_options, short_hint, split_by_subject)
from brainlm_jax.data.scaling import RobustScaler


@dataclasses.dataclass
class RunData:
  """Training and validation recordings (split by subject), every skipped file with its reason,
  the robust scaler (fitted on the training subjects, or restored), coordinates [P, 3] | None."""
  train: list
  val: list
  skipped: list
  scaler: RobustScaler
  coords: np.ndarray | None

  def report(self) -> dict:
    """The run's data report: which recordings trained, which validated, which were skipped."""
    def rows(rs):
      out = []
      for r in rs:
        row = {"path": r.path, "subject": r.subject, "shape": list(r.signal.shape)}
        row.update({k: v for k, v in (("site", r.site), ("tr", r.tr)) if v is not None})
        if r.dead.size:  # constant parcels, kept as missing
          row["dead_parcels"] = r.dead.tolist()
        out.append(row)
      return out
    return {"train": rows(self.train), "validation": rows(self.val), "skipped": self.skipped}


def _prepare_tfds(d: ml_collections.ConfigDict, directory: str,
                  scaler_dict: dict | None, window: int) -> RunData:
  """Train/validation splits (by subject, made by the builder) and the stored scaler."""
  from brainlm_jax.data import tfds_source  # pylint: disable=import-outside-toplevel  # (TensorFlow)
  train, info = tfds_source.load_split(directory, "train")
  splits = (info.get("subjects") or {}).keys()
  val = tfds_source.load_split(directory, "validation")[0] if "validation" in splits else []
  train, short_train = drop_short(train, window)
  val, short_val = drop_short(val, window)
  if not train:
    raise ValueError(f"{directory}: no training recording has {window} timepoints"
                     f"{short_hint(short_train)}")
  coords = readers.load_coordinates(d.coords) if d.coords else info["coords"]
  if coords is not None and len(coords) != train[0].num_parcels:
    raise ValueError(f"{d.coords or directory}: {len(coords)} coordinates but the recordings of "
                     f"{directory} have {train[0].num_parcels} parcels")
  scaler = RobustScaler.from_dict(scaler_dict or info["scaler"])
  for option in ("center_recordings", "scale_recordings"):
    if scaler_dict is None and bool(d.get(option)) != getattr(scaler, option):
      logging.warning("data.%s=%s is not used: the dataset %s stores its scaling statistics, "
                      "computed with %s=%s (rebuild it with that builder option to change it)",
                      option, d.get(option), directory, option, getattr(scaler, option))
  logging.info("Prepared dataset %s: %d train / %d validation recordings", directory,
               len(train), len(val))
  return RunData(train, val, short_train + short_val, scaler, coords)


def prepare_data(config: ml_collections.ConfigDict, scaler_dict: dict | None = None, *,
                 window: int | None = None) -> RunData:
  """Loads recordings, splits by subject, fits (or restores, from `scaler_dict`) the scaler.

  config.data.path is either recordings (dir, glob, file) or a prepared `brainlm_fmri` TFDS
  dataset (`brainlm-prepare build`), whose subject splits and stored scaling statistics are used.
  Recordings shorter than `window` (default data.window; the connectivity objective's samples
  are longer) are skipped after the split, which is made on the recordings of at least one
  data.window: so runs of either objective on the same data hold out the same subjects.
  """
  d = config.data
  window = int(window or d.window)
  if not d.path:
    raise ValueError("data.path is empty: set --config.data.path=DIR_OR_GLOB")
  prepared = prepared_dataset(d.path, d.get("tfds_config"))
  if prepared:
    return _prepare_tfds(d, prepared, scaler_dict, window)
  coords = readers.load_coordinates(d.coords) if d.coords else None
  num_parcels = d.num_parcels or (len(coords) if coords is not None else None)
  recs, skipped = load_recordings(d.path, window=int(d.window), num_parcels=num_parcels,
                                  subject_pattern=d.subject_pattern, **recording_options(d))
  if coords is not None and recs[0].num_parcels != len(coords):
    raise ValueError(f"data.coords {d.coords} has {len(coords)} parcels but the recordings in "
                     f"{d.path} have {recs[0].num_parcels}")
  split_seed = d.get("split_seed", -1)
  train, val = split_by_subject(recs, val_fraction=d.val_fraction,
                                seed=config.seed if split_seed < 0 else split_seed)
  if window > int(d.window):
    train, short_train = drop_short(train, window)
    val, short_val = drop_short(val, window)
    skipped = skipped + short_train + short_val
    if not train:
      raise ValueError(f"{d.path}: no training recording has {window} timepoints (one sample)"
                       f"{short_hint(short_train)}")
  if scaler_dict is not None:
    scaler = RobustScaler.from_dict(scaler_dict)
  else:
    scaler = RobustScaler().fit(train, center_recordings=d.center_recordings,
                                scale_recordings=d.scale_recordings)
  return RunData(train, val, skipped, scaler, coords)
