"""Reading a prepared `brainlm_fmri` TFDS dataset back as `readers.Recording`s.

  recs, info = load_split("DATA/brainlm_fmri/a424/1.0.0", "train")
  recs, info = load_split("DATA", "validation", config="hcp_aal94")   # a TFDS data_dir
  scaler = scaling.RobustScaler.from_dict(info["scaler"])           # the stored statistics
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from brainlm_jax.data.readers import Recording

__all__ = ["dataset_dir", "load_split", "split_names"]

NAME = "brainlm_fmri"


def dataset_dir(path: str, config: str | None = None) -> str:
  """The prepared dataset folder (holding dataset_info.json) that `path` names.

  `path` is that folder itself, or a TFDS data_dir (``path/brainlm_fmri/CONFIG/VERSION``; with
  several configs/versions, `config` picks one and the newest version wins).

  Raises:
    FileNotFoundError: nothing prepared there (the message lists what was looked for).
  """
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  pattern = os.path.join(path, NAME, config or "*", "*", "dataset_info.json")
  found = sorted(glob.glob(pattern))
  configs = sorted({f.split(os.sep)[-3] for f in found})
  if not found:
    raise FileNotFoundError(f"{path}: no prepared {NAME} dataset (looked for {pattern}); "
                            "build one with `brainlm-prepare build`")
  if len(configs) > 1:
    raise ValueError(f"{path}: several {NAME} configs {configs}; choose one (config=...)")
  newest = max(found, key=lambda f: tuple(int(v) for v in f.split(os.sep)[-2].split(".")))
  return os.path.dirname(newest)


def split_names(directory: str) -> list[str]:
  """The splits of a prepared dataset folder (e.g. ['train', 'validation', 'test'])."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # (TensorFlow)
  return list(tfds.builder_from_directory(directory).info.splits)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_split(data_dir_or_name: str, split: str, *,
               config: str | None = None) -> tuple[list[Recording], dict[str, Any]]:
  """All examples of one split as recordings (signal float32 ``[time, parcels]``, unscaled).

  Args:
    data_dir_or_name: a prepared dataset folder or a TFDS data_dir (see `dataset_dir`).
    split: 'train', 'validation' or 'test' (any TFDS split spec, e.g. 'train[:50%]').
    config: builder config name when the data_dir holds several.

  Returns:
    ``(recordings, info)``; info: ``coords`` float32 ``[parcels, 3]`` or None, ``scaler``
    (`RobustScaler.to_dict()` of the training subjects), ``num_parcels``, per recording lists
    ``tr`` (None when unknown), ``site``, ``phenotypes`` (dicts) and ``start``, plus
    ``subjects`` (per split), ``phenotype_columns`` and ``dataset_dir``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # (TensorFlow)

  directory = dataset_dir(data_dir_or_name, config)
  builder = tfds.builder_from_directory(directory)
  meta = dict(builder.info.metadata or {})
  if "scaler" not in meta:
    raise ValueError(f"{directory}: metadata.json has no 'scaler' statistics; not built by the "
                     f"{NAME} builder?")
  if split not in builder.info.splits and "[" not in split:
    raise ValueError(f"{directory}: no split {split!r} (splits: {list(builder.info.splits)})")
  try:
    examples = builder.as_data_source(split)
  except NotImplementedError:  # TFRecord files: sequential reading.
    examples = tfds.as_numpy(builder.as_dataset(split, shuffle_files=False))
  recs, info = [], {"tr": [], "site": [], "phenotypes": [], "start": []}
  for ex in examples:
    tr = float(ex["tr"])
    path = _text(ex["path"])
    recs.append(Recording(path=path, subject=_text(ex["subject"]),
                                     signal=np.asarray(ex["signal"], np.float32),
                                     tr=tr if tr > 0 else None,
                                     site=_text(ex["site"]) or None))
    info["tr"].append(tr if tr > 0 else None)
    info["site"].append(_text(ex["site"]))
    info["phenotypes"].append(json.loads(_text(ex["phenotypes"]) or "{}"))
    info["start"].append(int(ex["start"]))
  coords = meta.get("coordinates")
  info.update(
      coords=None if coords is None else np.asarray(coords, np.float32),
      scaler=meta["scaler"], num_parcels=meta.get("num_parcels"),
      subjects=meta.get("subjects"), phenotype_columns=meta.get("phenotype_columns", []),
      dataset_dir=directory)
  return recs, info
