"""NIfTI BOLD scans -> parcel time series: one float32 ``[time, parcels]`` .npy per scan.

`parcellate` converts many scans with a process pool (one scan per worker at a time, read in
chunks of volumes, so memory is bounded by a few volumes per worker whatever the scan length) and
writes into OUT:

* ``<name>.npy``: float32 ``[time, parcels]``; ``<name>`` starts with the subject id, so
  `brainlm_jax.data.datasets.subject_of` recovers it;
* ``manifest.jsonl``: one JSON line per input: ``path, status ('ok'|'skipped'), reason, subject,
  output, shape, tr``;
* ``coordinates.dat``: ``label x y z`` (mm) of the output columns, in column order (from
  ``--coords`` or the atlas' parcel centroids);
* ``parcellation.json``: atlas, labels and cleaning options; a re-run into the same OUT must
  match it, and then skips the scans already converted (resumable).

Column ``j`` of every output is the mean over the voxels of the ``j``-th smallest non-zero atlas
label, after nearest-neighbour resampling of the atlas to the scan's grid when the grids differ:
the same numbers as nilearn's ``NiftiLabelsMasker`` (whose cleaning, `nilearn.signal.clean`, is
reused as is). Unlike the masker, a scan with NaN/inf voxels inside a parcel is skipped rather
than silently zero-filled, and so is a scan on whose grid some parcel has no voxel (every output
of one OUT has the same columns).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import logging as std_logging
import multiprocessing
import os
import re
import time
import zlib
from typing import Any, Iterable, Sequence

from absl import logging
import nibabel as nib
from nibabel import openers
import numpy as np

from brainlm_jax.data import datasets, readers
from brainlm_jax.data.readers import RecordingError

__all__ = [
    "Atlas",
    "CleanOptions",
    "MANIFEST",
    "NIFTI_EXTENSIONS",
    "find_scans",
    "load_atlas",
    "parcel_signals",
    "parcellate",
    "read_manifest",
    "scan_subject",
]

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
MANIFEST = "manifest.jsonl"
SETTINGS = "parcellation.json"
COORDINATES = "coordinates.dat"
MAX_DEAD_FRACTION = datasets.MAX_DEAD_FRACTION  # constant parcels kept up to this share
_BIDS_SUBJECT = re.compile(r"(?:^|[_/])(sub-[A-Za-z0-9]+)(?=[_./]|$)")


# ------------------------------------------------------------------------------------------
# Atlas.


@dataclasses.dataclass(frozen=True, eq=False)
class Atlas:
  """An integer label volume.

  Attributes:
    path: file it was read from.
    img: the label image (3-D).
    labels: int64 ``[parcels]``, the sorted non-zero labels: output column order.
    coords: float32 ``[parcels, 3]`` (mm), one row per label.
    coords_source: the coordinate file, or 'atlas centroids'.
  """

  path: str
  img: nib.Nifti1Image
  labels: np.ndarray
  coords: np.ndarray
  coords_source: str

  def fingerprint(self) -> str:
    """sha256 of the label grid (shape, affine, values): what a resumed run must match."""
    h = hashlib.sha256()
    h.update(repr(self.img.shape[:3]).encode())
    h.update(np.asarray(self.img.affine, np.float64).round(6).tobytes())
    h.update(np.ascontiguousarray(_label_data(self.img, self.path)).tobytes())
    return h.hexdigest()


def _label_data(img, path: str) -> np.ndarray:
  """int64 label array of a 3-D label image; ValueError naming `path` if it is not one."""
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3:
    raise ValueError(f"atlas {path}: expected a 3-D label volume, got shape {img.shape}")
  data = np.asarray(img.dataobj).reshape(shape)
  if data.dtype.kind == "f":
    if not np.isfinite(data).all():
      raise ValueError(f"atlas {path}: NaN/inf values; expected integer labels")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
      raise ValueError(f"atlas {path}: non-integer values (e.g. {data[rounded != data][0]:g}); "
                       "expected a label volume, not a probabilistic atlas")
    data = rounded
  elif data.dtype.kind not in "iu":
    raise ValueError(f"atlas {path}: data type {data.dtype} is not numeric")
  return data.astype(np.int64)


def load_atlas(path: str, coords: str | None = None) -> Atlas:
  """Reads a label atlas (and optionally its coordinate file: `readers.load_coordinates`).

  Without `coords` the coordinates are the parcels' centroids in the atlas' world space (mm).
  Coordinate rows for labels absent from the atlas are dropped (logged).

  Raises:
    FileNotFoundError / ValueError naming the file: unreadable atlas, not 3-D, non-integer
      labels, no parcel, or a parcel missing from the coordinate file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"atlas {path}: file not found")
  try:
    img = nib.load(path)
    data = _label_data(img, path)
  except (OSError, EOFError, nib.filebasedimages.ImageFileError) as e:
    raise ValueError(f"atlas {path}: cannot read ({type(e).__name__}: {e})") from e
  labels = np.unique(data)
  labels = labels[labels != 0]
  if labels.size == 0:
    raise ValueError(f"atlas {path}: no non-zero label")
  if coords:
    file_labels, xyz = readers.load_coordinates(coords, with_labels=True)
    if file_labels is None:  # 'x y z' rows: labels 1..rows
      file_labels = np.arange(1, len(xyz) + 1)
    rows = {int(l): i for i, l in enumerate(file_labels)}
    missing = [int(l) for l in labels if int(l) not in rows]
    if missing:
      raise ValueError(f"coordinates {coords}: no row for atlas label(s) {missing[:10]} of {path}")
    dropped = sorted(set(rows) - {int(l) for l in labels})
    if dropped:
      logging.warning("coordinates %s: label(s) %s are not in atlas %s; their rows are dropped",
                      coords, dropped[:10], path)
    xyz = xyz[[rows[int(l)] for l in labels]]
    source = os.fspath(coords)
  else:
    xyz = _centroids(data, labels, img.affine)
    source = "atlas centroids"
  return Atlas(path, img, labels, np.asarray(xyz, np.float32), source)


def _centroids(data: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """World (mm) centre of mass of each label's voxels: float64 ``[parcels, 3]``."""
  flat = data.ravel()
  inside = np.flatnonzero(flat)
  column = np.searchsorted(labels, flat[inside])
  ijk = np.stack(np.unravel_index(inside, data.shape), axis=1).astype(np.float64)
  counts = np.bincount(column, minlength=len(labels))
  mean = np.stack([np.bincount(column, ijk[:, a], len(labels)) for a in range(3)], 1)
  mean /= counts[:, None]
  return mean @ affine[:3, :3].T + affine[:3, 3]


@dataclasses.dataclass(frozen=True)
class _ParcelIndex:
  """Where each parcel's voxels are in a flattened (Fortran-order) volume of one grid."""

  voxels: np.ndarray  # int64 [voxels in parcels], grouped by parcel (column order)
  starts: np.ndarray  # int64 [parcels], first entry of each parcel in `voxels`
  counts: np.ndarray  # float64 [parcels]


def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
  return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b)


def _parcel_index(atlas: Atlas, path: str, shape: Sequence[int],
                  affine: np.ndarray) -> _ParcelIndex:
  """The atlas on a scan's grid (nearest neighbour when the grids differ, as NiftiLabelsMasker).

  Raises:
    RecordingError: some atlas parcel has no voxel on that grid (cannot be mapped).
  """
  if _same_grid(atlas.img.shape, atlas.img.affine, shape, affine):
    data = _label_data(atlas.img, atlas.path)
  else:
    from nilearn import image  # pylint: disable=import-outside-toplevel  # (slow import)
    try:
      target = nib.Nifti1Image(np.zeros(tuple(shape[:3]), np.int8), affine)
      img = image.resample_to_img(atlas.img, target, interpolation="nearest",
                                  force_resample=True, copy_header=True)
    except Exception as e:  # pylint: disable=broad-except  # e.g. a singular affine.
      raise RecordingError(
          path, f"atlas {os.path.basename(atlas.path)} cannot be mapped onto this scan: "
          f"resampling it to the scan's grid failed ({type(e).__name__}: {e})") from e
    data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
  flat = data.ravel(order="F")  # NIfTI voxel order.
  known = np.isin(flat, atlas.labels)
  voxels = np.flatnonzero(known)
  column = np.searchsorted(atlas.labels, flat[voxels])
  counts = np.bincount(column, minlength=len(atlas.labels))
  missing = atlas.labels[counts == 0]
  if missing.size == len(atlas.labels):
    raise RecordingError(
        path, f"atlas {os.path.basename(atlas.path)} cannot be mapped onto this scan: no parcel "
        f"overlaps its field of view (grid {tuple(shape[:3])}, origin "
        f"{np.round(affine[:3, 3], 1).tolist()} mm); is it in the atlas' space?")
  if missing.size:
    raise RecordingError(
        path, f"atlas {os.path.basename(atlas.path)} cannot be fully mapped onto this scan: "
        f"{missing.size} of {len(atlas.labels)} parcels have no voxel on its grid (labels "
        f"{missing[:10].tolist()}{', ...' if missing.size > 10 else ''})")
  order = np.argsort(column, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return _ParcelIndex(voxels[order], starts, counts.astype(np.float64))


# ------------------------------------------------------------------------------------------
# One scan.


@dataclasses.dataclass(frozen=True)
class CleanOptions:
  """Optional `nilearn.signal.clean` of the parcel signals (the NiftiLabelsMasker arguments).

  `confounds` names columns of the scan's confound table (fMRIPrep
  ``*_desc-confounds_timeseries.tsv`` beside the scan); `tr` overrides the scans' TR;
  `target_tr` resamples every cleaned series to that TR (`readers.resample_tr`), so scans from
  scanners with different TRs share one time axis.
  """

  detrend: bool = False
  standardize: str | bool = False
  low_pass: float | None = None
  high_pass: float | None = None
  confounds: tuple[str, ...] = ()
  tr: float | None = None
  target_tr: float | None = None

  @property
  def active(self) -> bool:
    return bool(self.detrend or self.standardize or self.low_pass or self.high_pass
                or self.confounds)


def _scan_shape(path: str, img) -> tuple[int, int, int, int]:
  shape = tuple(int(s) for s in img.header.get_data_shape())
  while len(shape) > 4 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) == 3:
    raise RecordingError(
        path, f"3-D image {shape}: expected a 4-D BOLD series (x, y, z, time)")
  if len(shape) != 4:
    raise RecordingError(
        path, f"{len(shape)}-D image {shape}: expected a 4-D BOLD series (x, y, z, time)")
  return shape  # type: ignore[return-value]


def _repetition_time(path: str, img) -> float | None:
  """TR in seconds: the BIDS sidecar's RepetitionTime, else the NIfTI header, else None."""
  sidecar = re.sub(r"\.nii(\.gz)?$", ".json", path)
  if sidecar != path and os.path.isfile(sidecar):
    try:
      with open(sidecar, encoding="utf-8") as f:
        tr = json.load(f).get("RepetitionTime")
      if tr:
        return float(tr)
    except (OSError, ValueError, AttributeError):
      logging.warning("%s: unreadable JSON sidecar; TR taken from the NIfTI header", sidecar)
  zooms = img.header.get_zooms()
  if len(zooms) < 4 or not np.isfinite(zooms[3]) or zooms[3] <= 0:
    return None
  unit = img.header.get_xyzt_units()[1]
  scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
  return float(zooms[3]) * scale


def _volume_chunks(path: str, img, shape, chunk_volumes: int):
  """Yields ``(first_volume, raw [volumes, voxels])``, streaming the file once."""
  proxy = img.dataobj  # nibabel's ArrayProxy knows the real data offset (vox_offset may be 0).
  if getattr(proxy, "order", "F") != "F":
    raise RecordingError(path, "voxel data is not in NIfTI (Fortran) order")
  dtype = np.dtype(proxy.dtype)
  num_voxels = int(np.prod(shape[:3]))
  volume_bytes = num_voxels * dtype.itemsize
  try:
    with openers.ImageOpener(path, "rb") as f:
      f.seek(int(proxy.offset))
      for t0 in range(0, shape[3], chunk_volumes):
        n = min(chunk_volumes, shape[3] - t0)
        buf = f.read(n * volume_bytes)
        if len(buf) < n * volume_bytes:
          raise RecordingError(
              path, f"truncated: the voxel data ends in volume {t0 + len(buf) // volume_bytes} "
              f"of {shape[3]}")
        yield t0, np.frombuffer(buf, dtype).reshape(n, num_voxels)
  except (EOFError, OSError, zlib.error) as e:  # gzip: EOFError (truncated), BadGzipFile, zlib.error
    raise RecordingError(
        path, f"truncated or corrupt file ({type(e).__name__}: {e})") from e


def _confounds(path: str, columns: Sequence[str], num_volumes: int) -> np.ndarray:
  """``[time, columns]`` from the fMRIPrep confound table next to `path` (n/a -> column mean)."""
  name = os.path.basename(path)
  prefix = re.split(r"_(?:space|res|desc)-|_bold\.nii", name)[0]
  candidates = [os.path.join(os.path.dirname(path), f"{prefix}_desc-confounds_{kind}.tsv")
                for kind in ("timeseries", "regressors")]
  table = next((c for c in candidates if os.path.isfile(c)), None)
  if table is None:
    raise RecordingError(path, f"confounds requested but no {candidates[0]} found")
  with open(table, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  absent = [c for c in columns if c not in header]
  if absent:
    raise RecordingError(path, f"confound table {table} lacks column(s) {absent}")
  idx = [header.index(c) for c in columns]
  values = np.array([[float(r[i]) if r[i] not in ("n/a", "") else np.nan for i in idx]
                     for r in rows], np.float64)
  if values.shape[0] != num_volumes:
    raise RecordingError(
        path, f"confound table {table} has {values.shape[0]} rows for {num_volumes} volumes")
  return np.where(np.isnan(values), np.nan_to_num(np.nanmean(values, axis=0)), values)


def parcel_signals(path: str, atlas: Atlas, *, clean: CleanOptions = CleanOptions(),
                   min_timepoints: int = 1, chunk_volumes: int = 16,
                   max_dead_fraction: float = MAX_DEAD_FRACTION,
                   _cache: dict | None = None) -> tuple[np.ndarray, float | None]:
  """Mean BOLD signal per atlas parcel of one 4-D scan.

  Args:
    path: a ``.nii``/``.nii.gz`` 4-D scan (read in chunks of `chunk_volumes` volumes).
    atlas: from `load_atlas`; resampled (nearest) to the scan's grid when the grids differ.
    clean: optional `nilearn.signal.clean` of the parcel signals.
    min_timepoints: scans with fewer volumes (after resampling to ``clean.target_tr``) are
      rejected before reading their data.
    chunk_volumes: volumes per read.
    max_dead_fraction: parcels constant over time (no signal there: outside the field of view)
      are kept, constant, up to this share of the parcels (downstream they are missing:
      `brainlm_jax.data.readers.dead_parcels`); more, and the scan is rejected.

  Returns:
    ``(signal float32 [time, parcels], tr seconds or None)``; the TR is ``clean.target_tr``
    when resampled.

  Raises:
    RecordingError naming the file: unreadable/truncated, not 4-D, too short, atlas not
      mappable, NaN/inf voxels inside a parcel, too many constant (zero-variance) parcels.
  """
  try:
    img = nib.load(path)
  except Exception as e:  # pylint: disable=broad-except  # nibabel raises many types.
    raise RecordingError(
        path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
  shape = _scan_shape(path, img)
  if shape[3] < min_timepoints and not clean.target_tr:
    raise RecordingError(
        path, f"{shape[3]} volumes, shorter than one window ({min_timepoints} timepoints)")
  tr = clean.tr or _repetition_time(path, img)
  if clean.target_tr:
    if not tr:
      raise RecordingError(path, f"resampling to TR {clean.target_tr} s needs the "
                                      "scan's TR, which is unknown (none in the header or a BIDS "
                                      "sidecar): pass --tr")
    resampled = readers.resampled_length(shape[3], tr, clean.target_tr)
    if resampled < min_timepoints:
      raise RecordingError(
          path, f"{shape[3]} volumes at TR {tr:g} s = {resampled} timepoints at TR "
          f"{clean.target_tr:g} s, shorter than one window ({min_timepoints} timepoints)")
  key = (shape[:3], np.asarray(img.affine).round(5).tobytes())
  index = None if _cache is None else _cache.get(key)
  if index is None:
    index = _parcel_index(atlas, path, shape, img.affine)
    if _cache is not None:
      _cache[key] = index
  out = np.empty((shape[3], len(atlas.labels)), np.float64)
  for t0, raw in _volume_chunks(path, img, shape, chunk_volumes):
    inside = raw[:, index.voxels]  # [volumes, voxels in parcels]
    sums = np.add.reduceat(inside, index.starts, axis=1, dtype=np.float64)
    means = sums / index.counts
    if not np.isfinite(means).all():
      bad = np.argwhere(~np.isfinite(inside))
      t, v = (int(i) for i in bad[0])
      ijk = np.unravel_index(int(index.voxels[v]), shape[:3], order="F")
      raise RecordingError(
          path, f"NaN/inf voxel values inside parcels ({len(bad)} in volumes {t0}-"
          f"{t0 + len(raw) - 1}, first at voxel {tuple(int(i) for i in ijk)}, volume {t0 + t})")
    out[t0:t0 + len(raw)] = means
  slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)  # Applied to the means.
  if (slope, inter) != (1.0, 0.0):
    out = out * slope + inter
  constant = np.flatnonzero(np.ptp(out, axis=0) == 0)
  if constant.size > max_dead_fraction * out.shape[1]:
    labels = atlas.labels[constant]
    raise RecordingError(
        path, f"{constant.size} of {out.shape[1]} parcel(s) constant over time (zero variance; "
        f"more than max_dead_fraction={max_dead_fraction:g}): labels "
        f"{labels[:10].tolist()}{', ...' if constant.size > 10 else ''} (column "
        f"{int(constant[0])} = {out[0, constant[0]]:g}); outside the brain mask?")
  value = out[0, constant]
  if clean.active:
    out = _clean(path, out, clean, tr)
  if clean.target_tr:
    out, tr = readers.resample_tr(out, tr, clean.target_tr, path), float(clean.target_tr)
  out[:, constant] = 0.0 if clean.active else value  # dead stays exactly constant
  return out.astype(np.float32), tr


def _clean(path: str, signals: np.ndarray, clean: CleanOptions, tr: float | None) -> np.ndarray:
  from nilearn import signal  # pylint: disable=import-outside-toplevel  # (slow import)
  if (clean.low_pass or clean.high_pass) and not tr:
    raise RecordingError(path, "band-pass filtering needs the TR, which is unknown "
                                    "(none in the header or a BIDS sidecar): pass --tr")
  confounds = (_confounds(path, clean.confounds, len(signals)) if clean.confounds else None)
  return signal.clean(signals, detrend=clean.detrend, standardize=clean.standardize,
                      standardize_confounds=True, t_r=tr, low_pass=clean.low_pass,
                      high_pass=clean.high_pass, confounds=confounds)


# ------------------------------------------------------------------------------------------
# Many scans.


def scan_subject(path: str) -> str:
  """Subject id: the last BIDS ``sub-<label>`` in the path, else `datasets.subject_of`."""
  found = _BIDS_SUBJECT.findall(os.fspath(path).replace(os.sep, "/"))
  return found[-1] if found else datasets.subject_of(path)


def _stem(path: str) -> str:
  return re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path), flags=re.IGNORECASE)


def output_name(path: str) -> str:
  """``<stem>.npy``, prefixed with the subject id when the file name does not start with it."""
  stem, subject = _stem(path), scan_subject(path)
  if datasets.subject_of(stem + ".npy") != subject:
    stem = f"{subject}_{stem}"
  return stem + ".npy"


def _is_nifti(name: str) -> bool:
  return name.lower().endswith(NIFTI_EXTENSIONS) and not name.startswith(".")


def find_scans(inputs: str | Sequence[str]) -> list[str]:
  """NIfTI files of a directory (recursive), glob, file, or a list of them; sorted, unique.

  Raises:
    FileNotFoundError: a missing path, a glob matching nothing, or no NIfTI file at all.
  """
  entries = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
  found = []
  for entry in map(os.fspath, entries):
    if os.path.isdir(entry):
      hits = sorted(os.path.join(root, f) for root, dirs, files in os.walk(entry)
                    for f in files if _is_nifti(f)
                    if not any(d.startswith(".") for d in os.path.relpath(root, entry).split(
                        os.sep) if d != "."))
      if not hits:
        raise FileNotFoundError(f"{entry}: no .nii/.nii.gz files found (searched recursively)")
      found += hits
    elif os.path.isfile(entry):
      found.append(entry)
    elif any(c in entry for c in "*?["):
      hits = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
      if not hits:
        raise FileNotFoundError(f"{entry}: glob pattern matched no files")
      found += hits
    else:
      raise FileNotFoundError(f"{entry}: no such file or directory")
  if not found:
    raise FileNotFoundError("no input scans given")
  return list(dict.fromkeys(found))


def read_manifest(out_dir: str) -> list[dict]:
  """The records of OUT/manifest.jsonl (later lines for the same path win); [] if absent."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    return []
  latest = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        latest[record["path"]] = record
  return list(latest.values())


def _source_stamp(path: str) -> list[int]:
  st = os.stat(path)
  return [int(st.st_size), int(st.st_mtime_ns)]


_WORKER: dict[str, Any] = {}


def _init_worker(atlas: Atlas, clean: CleanOptions, min_timepoints: int, chunk_volumes: int,
                 max_dead_fraction: float = MAX_DEAD_FRACTION):
  _WORKER.update(atlas=atlas, clean=clean, min_timepoints=min_timepoints,
                 chunk_volumes=chunk_volumes, max_dead_fraction=max_dead_fraction, cache={})
  std_logging.getLogger("nibabel").setLevel(std_logging.ERROR)


def _convert(path: str, out_path: str) -> dict:
  """Worker: one scan -> `out_path`; returns its manifest fields (never raises)."""
  start = time.perf_counter()
  record: dict[str, Any] = {"path": path, "status": "skipped", "reason": "", "shape": None,
                            "tr": None}
  try:
    signal, tr = parcel_signals(
        path, _WORKER["atlas"], clean=_WORKER["clean"], min_timepoints=_WORKER["min_timepoints"],
        chunk_volumes=_WORKER["chunk_volumes"], max_dead_fraction=_WORKER["max_dead_fraction"],
        _cache=_WORKER["cache"])
    tmp = out_path + ".partial.npy"
    np.save(tmp, signal)
    os.replace(tmp, out_path)
    record.update(status="ok", shape=list(signal.shape), tr=tr)
    dead = readers.dead_parcels(signal)
    if dead.size:  # kept, constant: missing downstream
      record["dead_parcels"] = [int(l) for l in _WORKER["atlas"].labels[dead]]
  except RecordingError as e:
    record["reason"] = e.problem
  except Exception as e:  # pylint: disable=broad-except  # One scan never stops the run.
    record["reason"] = f"unexpected {type(e).__name__}: {e}"
  record["seconds"] = round(time.perf_counter() - start, 3)
  return record


def _check_settings(out_dir: str, settings: dict) -> None:
  path = os.path.join(out_dir, SETTINGS)
  settings = json.loads(json.dumps(settings))  # As stored (tuples -> lists).
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    changed = [k for k in settings if previous.get(k) != settings[k]]
    if changed:
      raise ValueError(f"{out_dir} holds scans parcellated with other settings ({', '.join(changed)}"
                       f" differ, see {path}); use another --out or delete it")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=1)


def _write_coordinates(out_dir: str, atlas: Atlas) -> None:
  with open(os.path.join(out_dir, COORDINATES), "w", encoding="utf-8") as f:
    f.write(f"# label x y z (mm), one row per output column; from {atlas.coords_source}\n")
    for label, (x, y, z) in zip(atlas.labels, atlas.coords):
      f.write(f"{int(label)} {x:.4g} {y:.4g} {z:.4g}\n")


def default_workers() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parcellate(inputs: str | Sequence[str], atlas: str | Atlas, out_dir: str, *,
               coords: str | None = None, clean: CleanOptions = CleanOptions(),
               min_timepoints: int = 1, workers: int | None = None, chunk_volumes: int = 16,
               max_dead_fraction: float = MAX_DEAD_FRACTION, resume: bool = True) -> list[dict]:
  """Converts scans to parcel time series in `out_dir` (see the module docstring).

  Args:
    inputs: directory (recursive), glob, file, or list of them.
    atlas: label atlas path (or a loaded `Atlas`); `coords` its coordinate file.
    out_dir: output directory (created).
    clean: optional cleaning of the parcel signals.
    min_timepoints: shorter scans are skipped (default 1: every scan).
    workers: processes (default: the usable cores; at most one per scan).
    chunk_volumes: volumes read at a time per worker.
    max_dead_fraction: constant parcels kept (their atlas labels in the manifest's
      ``dead_parcels``) up to this share; more, and the scan is skipped.
    resume: keep the scans a previous run into `out_dir` converted (same source size/mtime).

  Returns:
    The manifest records of this run's inputs, in input order.

  Raises:
    FileNotFoundError/ValueError (one line): no inputs, a bad atlas or coordinate file, or
      `out_dir` made with other settings. Bad scans are skipped and recorded, never raised.
  """
  scans = find_scans(inputs)
  if not isinstance(atlas, Atlas):
    atlas = load_atlas(atlas, coords)
  os.makedirs(out_dir, exist_ok=True)
  _check_settings(out_dir, {
      "atlas": os.path.abspath(atlas.path), "atlas_sha256": atlas.fingerprint(),
      "labels": [int(l) for l in atlas.labels], "clean": dataclasses.asdict(clean)})
  _write_coordinates(out_dir, atlas)
  previous = {r["path"]: r for r in read_manifest(out_dir)} if resume else {}

  records: dict[str, dict] = {}
  early: list[dict] = []  # Duplicates and scans done by a previous run.
  todo: list[tuple[str, str]] = []
  owners: dict[str, str] = {}
  for path in scans:
    name, subject = output_name(path), scan_subject(path)
    base = {"path": path, "subject": subject, "output": name}
    if name in owners:
      early.append({**base, "status": "skipped", "shape": None, "tr": None,
                       "reason": f"same subject ({subject}) and scan name as {owners[name]}: its "
                                 f"output {name} would be overwritten (duplicate scan?)"})
      continue
    owners[name] = path
    old = previous.get(path)
    if (old and old.get("status") == "ok" and old.get("source") == _source_stamp(path)
        and os.path.isfile(os.path.join(out_dir, name))):
      early.append({**old, "reason": "already converted (previous run)", "resumed": True})
      continue
    todo.append((path, os.path.join(out_dir, name)))

  manifest = open(os.path.join(out_dir, MANIFEST), "a", encoding="utf-8")  # pylint: disable=consider-using-with
  def finish(record: dict) -> None:
    path = record["path"]
    record = {**{"subject": scan_subject(path), "output": output_name(path)}, **record}
    if record.get("resumed"):
      logging.info("[%d/%d] already done %s -> %s", len(records) + 1, len(scans), path,
                   record["output"])
    elif record["status"] == "ok":
      record["source"] = _source_stamp(path)
      logging.info("[%d/%d] ok %s -> %s %s (%.2fs)", len(records) + 1, len(scans), path,
                   record["output"], tuple(record["shape"]), record.get("seconds", 0.0))
    else:
      logging.warning("[%d/%d] skipped %s: %s", len(records) + 1, len(scans), path,
                      record["reason"])
    records[path] = record
    manifest.write(json.dumps(record) + "\n")
    manifest.flush()

  with manifest:
    for record in early:
      finish(record)
    workers = max(1, min(workers or default_workers(), len(todo) or 1))
    init = (atlas, clean, min_timepoints, chunk_volumes, max_dead_fraction)
    if workers == 1:
      _init_worker(*init)
      for path, out in todo:
        finish(_convert(path, out))
    else:
      context = multiprocessing.get_context(
          "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                  initializer=_init_worker,
                                                  initargs=init) as pool:
        futures = [pool.submit(_convert, path, out) for path, out in todo]
        for future in concurrent.futures.as_completed(futures):
          finish(future.result())

  ordered = [records[p] for p in scans]
  kept = [r for p, r in previous.items() if p not in records and r.get("status") == "ok"]
  tmp = os.path.join(out_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for r in ordered + kept:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, os.path.join(out_dir, MANIFEST))
  return ordered


def summarize(records: Iterable[dict]) -> str:
  """One line: converted / resumed / skipped counts."""
  records = list(records)
  ok = sum(r["status"] == "ok" and not r.get("resumed") for r in records)
  resumed = sum(bool(r.get("resumed")) for r in records)
  skipped = sum(r["status"] != "ok" for r in records)
  return (f"{len(records)} scan(s): {ok} converted, {resumed} already done, {skipped} skipped")
