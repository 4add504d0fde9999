"""Assembling a dataset from recordings: discovery, subject ids, splits, scaling statistics.

  load_recordings(data, window=W) -> (recordings, skipped)    a folder, glob, list or TFDS dataset
  subject_of(path, pattern) -> subject id                     from the file name
  subjects_from_names(paths, subjects, pattern)               the file names' distinct prefixes
                                                               when the default pattern gives
                                                               every file one id
  drop_short(recordings, window) -> (kept, skipped)           the one short-window filter
  split_by_subject(recordings, val_fraction=f) -> (train, val)
  prepared_dataset(path) -> TFDS dataset folder | None        the one TFDS detector

What a pretraining run reads (splits, scaler, coordinates) is `run_data.prepare_data`'s.

Bad files are skipped with the reason (never fatal); reading one file is `readers.py`'s.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import os
import re
import sys
from typing import Any, Sequence

from absl import logging

from brainlm_jax.data import cohort as cohort_lib
from brainlm_jax.data import readers
from brainlm_jax.data.readers import SUPPORTED_EXTENSIONS, Recording

__all__ = [
    "DEFAULT_SUBJECT_PATTERN", "distinct_name_prefixes", "drop_name_lists", "drop_short",
    "load_recordings", "prepared_dataset", "recording_options", "resolve_paths",
    "split_by_subject", "subject_of", "subjects_from_names",
]

# A BIDS `sub-<label>`; else the first token of 5 or more digits (multi-site names such as
# ABIDE's `CMU_a_0050642_rois_cc200.1D` or `UM_1_0050272_...`: the site comes first); else the
# first `_`- or `.`-separated token of the file name.
DEFAULT_SUBJECT_PATTERN = (r"^(?:(?!sub-)(?:[^_.]+_)*?(?=\d{5,}(?:[_.-]|$)))?"
                           r"(sub-[A-Za-z0-9]+|\d{5,}(?=[_.-]|$)|[^_.]+)")

PathLike = str | os.PathLike
MAX_DEAD_FRACTION = 0.1  # recordings with more constant parcels than this share are skipped


def subject_of(path: PathLike, pattern: str = DEFAULT_SUBJECT_PATTERN) -> str:
  """Subject id from a file name.

  ``pattern`` is matched (``re.match``) against the base name; its first
  group (or whole match) is the id. Examples with the default pattern:
  ``sub-01_task-rest_bold.npy`` -> ``sub-01``; ``102311_REST1_LR.mat`` ->
  ``102311``. If nothing matches, the name without extension is returned.
  """
  name = os.path.basename(os.fspath(path))
  m = re.match(pattern, name)
  if m:
    subject = m.group(1) if m.re.groups else m.group(0)
    if subject:
      return subject
  return name.split(".", 1)[0] or name


def _has_glob_chars(s: str) -> bool:
  return any(c in s for c in "*?[")


def _matches(name: str, extensions: Sequence[str]) -> bool:
  name = name.lower()
  return any(name.endswith(e.lower()) for e in extensions)


def _find_in_dir(directory: str, extensions: Sequence[str]) -> list[str]:
  found = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in files:
      if not f.startswith(".") and _matches(f, extensions):
        found.append(os.path.join(root, f))
  return sorted(found)


def resolve_paths(data, extensions: Sequence[str]) -> list[str]:
  """Expands `data` (dir, glob, file or list of them) to a list of file paths."""
  if isinstance(data, (str, os.PathLike)):
    entry = os.fspath(data)
    if os.path.isdir(entry):
      paths = _find_in_dir(entry, extensions)
      if not paths:
        raise FileNotFoundError(
            f"{entry}: no recording files with extensions {tuple(extensions)} found "
            "(searched recursively)")
      return paths
    if os.path.isfile(entry):
      return [entry]
    if _has_glob_chars(entry):
      paths = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
      if not paths:
        raise FileNotFoundError(f"{entry}: glob pattern matched no files")
      return paths
    raise FileNotFoundError(f"{entry}: no such file or directory")
  entries = [os.fspath(p) for p in data]
  if not entries:
    raise FileNotFoundError("load_recordings: empty list of paths")
  paths = []
  for entry in entries:
    if os.path.isdir(entry) or (_has_glob_chars(entry) and not os.path.exists(entry)):
      paths.extend(resolve_paths(entry, extensions))
    else:
      paths.append(entry)  # A missing file is reported as a skipped recording.
  return list(dict.fromkeys(paths))  # De-duplicate, keep order.


def drop_name_lists(paths: Sequence[str]) -> list[str]:
  """`paths` without lists of names (`readers.is_name_list`, e.g. a ``region_names.txt`` beside
  the recordings: not a recording, so neither read nor skipped), logged at INFO. A path list of
  nothing but name lists is returned as it is (its files are then reported as unusable)."""
  names = [p for p in paths if readers.is_name_list(p)]
  if not names or len(names) == len(paths):
    return list(paths)
  logging.info("Not recordings (lists of names, e.g. region names): %s",
               ", ".join(os.path.basename(p) for p in names))
  names = set(names)
  return [p for p in paths if p not in names]


def distinct_name_prefixes(paths: Sequence[PathLike]) -> list[str] | None:
  """Ids that tell the files apart by name: each base name's `_`/`.`-separated tokens up to and
  including the first token position whose values differ across the files.

  ``NAP_001_rest.mat``, ``NAP_002_rest.mat`` -> ``NAP_001``, ``NAP_002``;
  ``NAP_001_rest1.mat``, ``NAP_001_rest2.mat``, ``NAP_002_rest1.mat`` -> ``NAP_001``,
  ``NAP_001``, ``NAP_002``. None when no position differs (one name in several folders).
  """
  parts = [re.split(r"([_.])", os.path.basename(os.fspath(p))) for p in paths]
  tokens = [p[::2] for p in parts]  # the separators sit at the odd positions
  for i in range(max(map(len, tokens), default=0)):
    if len({t[i] if i < len(t) else None for t in tokens}) > 1:
      return ["".join(p[:2 * i + 1]) for p in parts]
  return None


def subjects_from_names(paths: Sequence[PathLike], subjects: Sequence[str],
                        pattern: str) -> list[str]:
  """The subject ids of `paths` (`subjects`, from `pattern`), or, when the default pattern gave
  every one of 2+ files the same first-token id (``NAP_001_rest.mat``, ``NAP_002_rest.mat``,
  ... all ``NAP``: a site or study prefix, not a subject), `distinct_name_prefixes` (logged at
  INFO). A user's pattern, and ids the default pattern found as a BIDS ``sub-`` label or a
  number of 5+ digits (several runs of one subject), are kept."""
  if (pattern != DEFAULT_SUBJECT_PATTERN or len(paths) < 2 or len(set(subjects)) != 1
      or re.fullmatch(r"sub-[A-Za-z0-9]+|\d{5,}", subjects[0])):
    return list(subjects)
  names = distinct_name_prefixes(paths)
  if names is None:
    return list(subjects)
  logging.info("The default subject pattern gives all %d recordings the subject id %r; subject "
               "ids are taken from the file names instead (%s, ...): set a subject pattern "
               "(--subject-pattern / --config.data.subject_pattern) whose first group is the "
               "id to choose them", len(paths), subjects[0], ", ".join(sorted(set(names))[:3]))
  return names


def load_recordings(
    data: PathLike | Sequence[PathLike],
    *,
    window: int,
    num_parcels: int | None = None,
    subject_pattern: str = DEFAULT_SUBJECT_PATTERN,
    extensions: Sequence[str] = SUPPORTED_EXTENSIONS,
    target_tr: float = 0.0,
    max_dead_fraction: float = MAX_DEAD_FRACTION,
    cohort_options: dict | None = None,
) -> tuple[list[Recording], list[dict]]:
  """Loads every usable recording; bad files are skipped, never fatal.

  Args:
    data: a directory (searched recursively, sorted, hidden files ignored), a
      glob pattern, a single file, or a list of paths (kept in order); or a
      prepared `brainlm_fmri` TFDS dataset (all its splits are returned).
    window: minimum number of timepoints; shorter recordings are skipped.
    num_parcels: required parcel count (also fixes orientation). If None the
      most common parcel count (axis 1) wins, recordings stored the other way round
      (``[parcels, time]``) are transposed, and the rest are skipped.
    subject_pattern: regex for `subject_of` (when no cohort table names the file). When the
      default pattern gives every file one id, the ids come from the file names instead
      (`subjects_from_names`).
    extensions: file suffixes to pick up in directories (case-insensitive).
    target_tr: resample every recording to this repetition time (s; 0: keep each its own). A
      recording whose TR is unknown is then skipped.
    max_dead_fraction: recordings with up to this share of constant ("dead") parcels are kept
      (`Recording.dead` lists them); more, and the recording is skipped.
    cohort_options: `cohort.detect` overrides (phenotypes, id_column, subject_column,
      site_column, tr_table, tr_column). When `data` is a folder with a phenotype table beside
      its recordings (see cohort.py), subject ids (`Cohort.subject`), sites and TRs come from it.
      Lists of names beside the recordings (`readers.is_name_list`) are left out.

  Returns:
    ``(recordings, skipped)``: recordings with ``signal`` float32
    ``[time, parcels]``; ``skipped`` holds ``{"path": str, "reason": str}``
    for each rejected file (a warning is also logged for each).

  Raises:
    FileNotFoundError: missing directory/file, glob matching nothing, or a
      directory without supported files.
    ValueError: every file was rejected (the reasons are listed).
  """
  if int(window) < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  unknown = [e for e in extensions if e.lower() not in {s.lower() for s in SUPPORTED_EXTENSIONS}]
  if unknown:
    raise ValueError(f"unsupported extensions {unknown}; supported: {SUPPORTED_EXTENSIONS}")
  prepared = prepared_dataset(data)
  if prepared:
    return _load_prepared(prepared, window, num_parcels)
  paths = drop_name_lists(resolve_paths(data, extensions))

  skipped: list[dict] = []

  def skip(path: str, reason: str) -> None:
    logging.warning("Skipping recording %s", reason)
    skipped.append({"path": path, "reason": reason})

  group = cohort_lib.detect(data, paths, **(cohort_options or {})) if (
      isinstance(data, (str, os.PathLike)) and os.path.isdir(data) or cohort_options) else None
  if group is not None:
    tables = {os.path.abspath(t) for t in (group.phenotypes, group.tr_table) if t}
    paths = [p for p in paths if os.path.abspath(p) not in tables]
    for line in group.describe(paths):
      logging.info("Cohort %s: %s", os.fspath(data), line)
  loaded: list[Recording] = []
  named: set[str] = set()  # the paths whose subject a cohort table gives
  for path in paths:
    try:
      name = group.subject(path) if group is not None else None
      tr = group.tr(path) if group is not None else None
      signal = readers.load_at_tr(path, num_parcels=num_parcels, tr=tr, target_tr=target_tr,
                                  max_dead_fraction=max_dead_fraction)
      tr = target_tr or tr
    except readers.RecordingError as e:
      skip(path, str(e))
      continue
    except Exception as e:  # Defensive: never let one file stop the run.
      skip(path, f"{path}: unexpected {type(e).__name__}: {e}")
      continue
    loaded.append(Recording(path=path, subject=name or subject_of(path, subject_pattern),
                            signal=signal, tr=tr,
                            site=group.site(path) if group is not None else None))
    if name:
      named.add(path)
  by_pattern = [r for r in loaded if r.path not in named]  # a cohort table's ids stay
  for r, subject in zip(by_pattern, subjects_from_names(
      [r.path for r in by_pattern], [r.subject for r in by_pattern], subject_pattern)):
    r.subject = subject
  n_dead = sum(r.dead.size > 0 for r in loaded)
  if n_dead:
    logging.info("%d recording(s) have constant (dead) parcels, kept as missing: %s", n_dead,
                 ", ".join(f"{os.path.basename(r.path)} ({r.dead.size})"
                           for r in loaded if r.dead.size)[:400])

  if loaded and num_parcels is None:
    majority = collections.Counter(r.num_parcels for r in loaded).most_common(1)[0][0]
    kept = []
    for r in loaded:
      if r.num_parcels != majority and r.signal.shape[0] == majority:
        # Stored [parcels, time] (e.g. one site's export): orient it like the others.
        logging.info("%s: shape %s read as [parcels, time] (most recordings have %d "
                     "parcels)", r.path, r.signal.shape, majority)
        try:  # re-validated in this orientation (constant parcels), not re-read
          r = Recording(path=r.path, subject=r.subject,
                        signal=readers.validate(r.path, r.signal, readers.extension(r.path),
                                                majority, max_dead=sys.maxsize),
                        tr=r.tr, site=r.site)
        except readers.RecordingError as e:
          skip(r.path, str(e))
          continue
      if r.num_parcels == majority:
        kept.append(r)
      else:
        skip(r.path, f"{r.path}: {r.num_parcels} parcels, but most recordings have "
             f"{majority} (pass num_parcels to choose)")
    loaded = kept

  loaded, short = drop_short(loaded, window)
  for s in short:
    logging.warning("Skipping recording %s", s["reason"])
  skipped += short
  if not loaded:
    reasons = "\n  ".join(s["reason"] for s in skipped)
    raise ValueError(f"no usable recordings among {len(paths)} file(s):\n  {reasons}"
                     f"{short_hint(short)}")
  _warn_crowded_subjects(loaded, subject_pattern)
  logging.info("Loaded %d recordings (%d subjects, %d parcels); skipped %d.",
               len(loaded), len({r.subject for r in loaded}), loaded[0].num_parcels,
               len(skipped))
  return loaded, skipped


MAX_RUNS_PER_SUBJECT = 4  # more recordings under one subject id suggests a wrong subject_pattern


def _warn_crowded_subjects(recordings: Sequence[Recording], pattern: str) -> None:
  """Warns when one subject id holds many recordings: names like ``Pitt_0050003_rois.1D``
  (site first) would make the split by subject a split by site."""
  counts = collections.Counter(r.subject for r in recordings)
  subject, n = counts.most_common(1)[0]
  if n <= MAX_RUNS_PER_SUBJECT:
    return
  examples = [os.path.basename(r.path) for r in recordings if r.subject == subject][:3]
  logging.warning(
      "Subject id %r (from subject_pattern %r) covers %d recordings, e.g. %s: if the id is not "
      "the start of the file names, set a pattern whose first group is the id, e.g. "
      "--config.data.subject_pattern='^[^_]+_([^_]+)' for SITE_ID_... names; splits and "
      "subject-level metrics are by this id.", subject, pattern, n, ", ".join(examples))


def prepared_dataset(data, config: str | None = None) -> str | None:
  """The `brainlm_fmri` TFDS dataset folder (`brainlm-prepare build`) that `data` names (the
  dataset folder itself or a TFDS data_dir; `config` picks a builder config), or None when
  `data` is not one (plain recordings)."""
  if not isinstance(data, (str, os.PathLike)) or not os.path.isdir(data):
    return None
  from brainlm_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  try:
    return tfds_source.dataset_dir(os.fspath(data), config or None)
  except FileNotFoundError:
    return None


def drop_short(recordings: Sequence[Recording], window: int) -> tuple[list[Recording], list[dict]]:
  """(recordings with at least `window` timepoints, a skip entry {path, reason} for each other)."""
  kept, skipped = [], []
  for r in recordings:
    if r.num_timepoints < window:
      skipped.append({"path": r.path, "reason": f"{r.path}: {r.num_timepoints} timepoints, "
                      f"shorter than window={window}", "timepoints": r.num_timepoints})
    else:
      kept.append(r)
  return kept, skipped


def short_hint(short: Sequence[dict]) -> str:
  if not short:
    return ""
  longest = max(s["timepoints"] for s in short)
  return (f"\n{len(short)} recording(s) are shorter than one window (the longest: {longest} "
          f"timepoints): a shorter window, e.g. --config.data.window=N with N <= {longest} and a "
          "multiple of model.patch_len, keeps them")


def _load_prepared(directory: str, window: int,
                   num_parcels: int | None) -> tuple[list[Recording], list[dict]]:
  """Every split of a prepared dataset as recordings (unscaled), with the same skip rules."""
  from brainlm_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  loaded, skipped = [], []
  for split in tfds_source.split_names(directory):
    recs, _ = tfds_source.load_split(directory, split)
    for r in recs:
      if num_parcels is not None and r.num_parcels != num_parcels:
        skipped.append({"path": r.path, "reason": f"{r.path}: {r.num_parcels} parcels, "
                        f"expected {num_parcels}"})
      else:
        loaded.append(r)
  loaded, short = drop_short(loaded, window)
  skipped += short
  if not loaded:
    raise ValueError(f"{directory}: no usable recordings in the prepared dataset"
                     f"{short_hint(short)}")
  return loaded, skipped


def _subject_rank(subject: str, seed: int) -> str:
  return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def split_by_subject(
    recordings: Sequence[Recording],
    *,
    val_fraction: float = 0.2,
    num_val_subjects: int | None = None,
    seed: int = 0,
) -> tuple[list[Recording], list[Recording]]:
  """Splits recordings into ``(train, val)`` by subject (never by window).

  Subjects are ordered by a hash of ``(seed, subject)``, so the split is
  deterministic, independent of input order and of NumPy versions, and a
  subject keeps its side when other subjects are added (unless the
  validation count changes). The validation set gets ``num_val_subjects``
  subjects, or ``round(val_fraction * n_subjects)`` clamped to
  ``[1, n_subjects - 1]``. Input order is preserved within each split.

  Raises:
    ValueError: validation requested with fewer than 2 subjects, or an
      invalid fraction/count.
  """
  subjects = sorted({r.subject for r in recordings})
  n = len(subjects)
  if num_val_subjects is None:
    if not 0.0 <= val_fraction < 1.0:
      raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else min(max(int(round(val_fraction * n)), 1), n - 1)
    requested = val_fraction > 0
  else:
    n_val = int(num_val_subjects)
    requested = n_val > 0
    if n_val < 0 or (requested and n_val > n - 1):
      raise ValueError(
          f"num_val_subjects={num_val_subjects} must be in [0, {max(n - 1, 0)}] "
          f"for {n} subjects")
  if requested and n < 2:
    raise ValueError(
        f"cannot split {n} subject(s) into train and validation; need at least 2 "
        f"(subjects: {subjects}); val_fraction=0 (--config.data.val_fraction=0) trains "
        "without a validation split")
  if not requested:
    return list(recordings), []
  order = sorted(subjects, key=lambda s: _subject_rank(s, seed))
  val_subjects = set(order[:n_val])
  train = [r for r in recordings if r.subject not in val_subjects]
  val = [r for r in recordings if r.subject in val_subjects]
  return train, val




def recording_options(d) -> dict:
  """`load_recordings` options from a config's data section (absent fields: the defaults)."""
  return {"target_tr": float(d.get("tr") or 0.0),
          "max_dead_fraction": float(d.get("max_dead_fraction", MAX_DEAD_FRACTION))}


def subjects_of(recordings: Sequence[Any]) -> list[str]:
  """The sorted distinct subject ids of `recordings`."""
  return sorted({r.subject for r in recordings})
