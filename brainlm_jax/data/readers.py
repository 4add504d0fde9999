"""Reading one parcellated recording (a region/parcel time series) or a coordinate file.

A *recording* is one scan's parcel time series, held as a float32 array of shape
``[time, parcels]``. This module reads such arrays from common on-disk formats, validates them
(shape, finiteness; constant parcels are counted, up to `max_dead_fraction`), resamples them to another repetition time and reads
parcel coordinates. Finding recordings, naming their subjects and splitting them is
`datasets.py`'s.

Supported formats (matched case-insensitively on the file suffix):

* ``.mat``  -- MATLAB (v4/v5/v7, via ``scipy.io.loadmat``). The variable ``tc`` is
  used if present (the neurolib / HCP-AAL convention), otherwise the single
  2-D numeric variable; more than one candidate is an error.
* ``.npy``  -- NumPy array (``allow_pickle=False``).
* ``.csv`` / ``.tsv`` -- comma / tab separated numbers; an optional header row
  of ROI names is skipped (the first row is a header if any of its fields is
  non-numeric; purely numeric ROI labels would be read as data).
* ``.1D`` / ``.txt`` -- whitespace separated numbers (AFNI style); ``#`` starts a
  comment.

Orientation rule (how ``[time, parcels]`` is decided):

* If ``num_parcels`` is given, the array is oriented so that axis 1 has
  ``num_parcels`` entries (transposed if only axis 0 matches); if neither axis
  matches the file is rejected.
* Otherwise ``.npy``/``.csv``/``.tsv``/``.1D``/``.txt`` are taken as
  ``[time, parcels]`` (the nilearn / BIDS convention: one row per volume), and
  ``.mat`` arrays are transposed when their first axis is shorter than the
  second, because MATLAB toolboxes (neurolib's ``tc``) store ``[regions, time]``
  and recordings normally have more timepoints than regions.
"""

from __future__ import annotations

import csv
import dataclasses
import fractions
import os
import sys
from typing import Iterable

import numpy as np

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Recording",
    "RecordingError",
    "load_coordinates",
    "load_signal",
    "resample_tr",
    "dead_parcels",
    "is_name_list",
    "resampled_length",
]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".mat", ".npy", ".csv", ".tsv", ".1D", ".txt")

PathLike = str | os.PathLike


class RecordingError(ValueError):
  """A recording file that cannot be used; the message names the file and the problem."""

  def __init__(self, path: PathLike, problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")

  def __reduce__(self):
    return (type(self), (self.path, self.problem))


@dataclasses.dataclass(eq=False)  # eq=False: `==` on ndarray fields is ambiguous.
class Recording:
  """One parcellated scan (compared by identity).

  Attributes:
    path: file it was read from.
    subject: subject id (see `datasets.subject_of`); used to split by subject.
    signal: float32 ``[time, parcels]``.
    tr: repetition time in seconds, if known (after resampling: the target TR).
    site: acquisition site, if known (a cohort's site column).
  """

  path: str
  subject: str
  signal: np.ndarray  # [time, parcels] float32
  tr: float | None = None
  site: str | None = None

  @property
  def num_timepoints(self) -> int:
    return int(self.signal.shape[0])

  @property
  def num_parcels(self) -> int:
    return int(self.signal.shape[1])

  @property
  def dead(self) -> np.ndarray:
    """Indices of constant parcels (kept as missing; see `dead_parcels`)."""
    return dead_parcels(self.signal)


# ----------------------------------------------------------------------------
# Single-file readers. Each returns a raw array (any dtype/ndim) or raises
# RecordingError; validation happens in `load_signal`.
# ----------------------------------------------------------------------------


def extension(path: PathLike) -> str | None:
  """The supported extension (canonical spelling) that `path` ends with, else None."""
  name = os.path.basename(os.fspath(path)).lower()
  for ext in SUPPORTED_EXTENSIONS:
    if name.endswith(ext.lower()):
      return ext
  return None


def _is_numeric(a: np.ndarray) -> bool:
  return a.dtype.kind in "iuf"


def _read_mat(path: str) -> np.ndarray:
  import scipy.io  # Local import: scipy.io is only needed for .mat files.

  try:
    variables = scipy.io.loadmat(path)
  except NotImplementedError as e:  # scipy raises this for v7.3 (HDF5) files.
    raise RecordingError(
        path, f"MATLAB v7.3 (HDF5) files are not supported; re-save with "
        f"save(..., '-v7') ({e})") from e
  except Exception as e:  # Corrupt/truncated files raise many different types.
    raise RecordingError(
        path, f"cannot read MATLAB file ({type(e).__name__}: {e})") from e
  names = sorted(k for k in variables if not k.startswith("__"))
  if "tc" in variables:
    name = "tc"
  else:
    arrays = {k: variables[k] for k in names if isinstance(variables[k], np.ndarray)}
    numeric = {k: v for k, v in arrays.items() if _is_numeric(v)}
    matrices = [k for k, v in numeric.items() if v.ndim == 2 and min(v.shape) > 1]
    if len(matrices) == 1:
      name = matrices[0]
    elif len(matrices) > 1:
      raise RecordingError(
          path, f"ambiguous MATLAB file: several 2-D numeric variables {matrices} "
          "and none named 'tc'")
    elif len(numeric) == 1:
      name = next(iter(numeric))  # Validation reports why it is unusable.
    else:
      raise RecordingError(
          path, f"no 2-D numeric variable found (variables: {names or 'none'})")
  value = variables[name]
  if not isinstance(value, np.ndarray) or not _is_numeric(value):
    raise RecordingError(path, f"MATLAB variable '{name}' is not a numeric array")
  if value.ndim == 2 and 1 in value.shape:
    # MATLAB has no 1-D arrays: vectors are stored as (1, n) or (n, 1).
    raise RecordingError(
        path, f"MATLAB variable '{name}' has shape {value.shape}: a vector, not a "
        "2-D [time, parcels] matrix")
  return value


def _read_npy(path: str) -> np.ndarray:
  try:
    value = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise RecordingError(path, f"cannot read .npy file ({e})") from e
  except Exception as e:
    raise RecordingError(
        path, f"cannot read .npy file ({type(e).__name__}: {e})") from e
  if not isinstance(value, np.ndarray):
    raise RecordingError(path, "not a single NumPy array")
  return value


def parse_float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _rows_to_array(path: str, rows: Iterable[tuple[int, list[str]]],
                   allow_header: bool) -> np.ndarray:
  """Parses ``(line_number, fields)`` rows into a 2-D float64 array."""
  data: list[list[float]] = []
  width = None
  first = True
  for line_no, fields in rows:
    fields = [f.strip() for f in fields]
    values = [parse_float(f) for f in fields]
    if first and allow_header and any(v is None for v in values):
      first = False  # Header row of ROI names.
      continue
    first = False
    for col, (f, v) in enumerate(zip(fields, values)):
      if v is None:
        what = "empty field" if not f else f"non-numeric value {f!r}"
        raise RecordingError(path, f"{what} at line {line_no}, column {col + 1}")
    if width is None:
      width = len(values)
    elif len(values) != width:
      raise RecordingError(
          path, f"line {line_no} has {len(values)} fields, expected {width}")
    data.append(values)  # type: ignore[arg-type]
  if not data:
    raise RecordingError(path, "empty: no numeric rows")
  return np.asarray(data, dtype=np.float64)


def open_text(path: str):
  return open(path, "r", encoding="utf-8-sig", newline="")


def _read_delimited(path: str, delimiter: str) -> np.ndarray:
  try:
    with open_text(path) as f:
      reader = csv.reader(f, delimiter=delimiter)
      rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
  except (UnicodeDecodeError, csv.Error) as e:
    raise RecordingError(path, f"cannot parse as text table ({e})") from e
  except OSError as e:
    raise RecordingError(path, f"cannot read file ({e})") from e
  return _rows_to_array(path, rows, allow_header=True)


def _read_whitespace(path: str) -> np.ndarray:
  try:
    with open_text(path) as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise RecordingError(path, f"cannot parse as text ({e})") from e
  except OSError as e:
    raise RecordingError(path, f"cannot read file ({e})") from e
  rows = []
  for i, line in enumerate(lines, start=1):
    fields = line.split("#", 1)[0].split()
    if fields:
      rows.append((i, fields))
  return _rows_to_array(path, rows, allow_header=False)


NAME_LIST_EXTENSIONS = (".txt", ".csv", ".tsv")
MAX_NAME_LIST_BYTES = 1 << 20  # a list of region names is small; a recording may be large


def is_name_list(path: PathLike) -> bool:
  """Whether `path` is a list of names (e.g. ``region_names.txt`` beside the recordings) rather
  than a recording: a small .txt/.csv/.tsv file whose non-empty lines are each one non-numeric
  token (no whitespace, comma or tab inside). Unreadable files are not name lists."""
  path = os.fspath(path)
  if (not path.lower().endswith(NAME_LIST_EXTENSIONS) or not os.path.isfile(path)
      or os.path.getsize(path) > MAX_NAME_LIST_BYTES):
    return False
  seen = False
  try:
    with open_text(path) as f:
      for line in f:  # stops at the first line that is not a name: a recording's first row
        text = line.strip()
        if not text:
          continue
        if len(text.split()) > 1 or "," in text or parse_float(text) is not None:
          return False
        seen = True
  except (OSError, UnicodeDecodeError):
    return False
  return seen


def validate(path: str, raw: np.ndarray, ext: str,
             num_parcels: int | None, max_dead: int = 0) -> np.ndarray:
  """Checks and orients a raw array; returns float32 ``[time, parcels]``. Up to `max_dead`
  constant ("dead": outside the field of view) parcels are kept (see `dead_parcels`)."""
  if raw.dtype.kind == "c":
    raise RecordingError(path, f"complex values (dtype {raw.dtype}) are not supported")
  if not _is_numeric(raw):
    raise RecordingError(path, f"non-numeric data (dtype {raw.dtype})")
  if raw.ndim != 2:
    raise RecordingError(
        path, f"expected a 2-D [time, parcels] array, got {raw.ndim}-D shape {raw.shape}")
  if raw.size == 0:
    raise RecordingError(path, f"empty array (shape {raw.shape})")
  if num_parcels is not None:
    if raw.shape[1] == num_parcels:
      pass
    elif raw.shape[0] == num_parcels:
      raw = raw.T
    else:
      raise RecordingError(
          path, f"shape {raw.shape} has no axis with num_parcels={num_parcels} entries")
  elif ext == ".mat" and raw.shape[0] < raw.shape[1]:
    raw = raw.T  # MATLAB convention [regions, time].
  with np.errstate(over="ignore"):
    signal = np.ascontiguousarray(raw, dtype=np.float32)
  finite = np.isfinite(signal)
  if not finite.all():
    n_nan = int(np.isnan(signal).sum())
    n_inf = int(signal.size - finite.sum() - n_nan)
    t, p = (int(i) for i in np.argwhere(~finite)[0])
    raise RecordingError(
        path, f"{n_nan} NaN and {n_inf} inf values (first at time index {t}, "
        f"parcel index {p})")
  if signal.shape[0] < 2:
    raise RecordingError(path, f"only {signal.shape[0]} timepoint (shape {signal.shape})")
  constant = dead_parcels(signal)
  if constant.size > max_dead:
    if constant.size == 1:
      p = int(constant[0])
      what = f"parcel index {p} is constant (value {signal[0, p]:g}; zero variance)"
    else:
      shown = [int(c) for c in constant[:10]]
      more = ", ..." if constant.size > 10 else ""
      what = (f"{constant.size} parcels are constant (zero variance), parcel indices "
              f"{str(shown)[:-1]}{more}]")
    if max_dead:
      what += f" (more than the {max_dead} dead parcels allowed)"
    raise RecordingError(path, what)
  return signal


def dead_parcels(signal: np.ndarray) -> np.ndarray:
  """Indices of the constant (zero-variance) parcels of ``[time, parcels]``: signal outside the
  field of view, kept as missing rather than dropping the recording."""
  return np.flatnonzero(np.ptp(signal, axis=0) == 0)


def load_at_tr(path: PathLike, *, num_parcels: int | None = None, tr: float | None = None,
               target_tr: float | None = None, max_dead_fraction: float = 1.0) -> np.ndarray:
  """`load_signal` for a dataset: float32 ``[time, parcels]`` resampled from `tr` to `target_tr`
  (when given; dead parcels stay exactly constant), up to `max_dead_fraction` of the parcels
  constant (more: RecordingError naming them, as for an unknown TR when resampling)."""
  signal = load_signal(path, num_parcels=num_parcels, max_dead=sys.maxsize)
  dead = dead_parcels(signal)
  if dead.size > max_dead_fraction * signal.shape[1]:
    raise RecordingError(
        path, f"{dead.size} of {signal.shape[1]} parcels are constant (zero variance; more "
        f"than max_dead_fraction={max_dead_fraction:g}), parcel indices "
        f"{dead[:10].tolist()}{' ...' if dead.size > 10 else ''}")
  if target_tr:
    if not tr:
      raise RecordingError(path, f"TR unknown, cannot resample to {target_tr:g} s (give a TR "
                           "table or a TR column of the phenotypes)")
    if abs(tr - target_tr) > 1e-6:
      constant = signal[0, dead]
      signal = resample_tr(signal, tr, target_tr, path)
      signal[:, dead] = constant  # dead stays exactly constant
  return signal


def load_signal(path: PathLike, *, num_parcels: int | None = None,
                max_dead: int = 0) -> np.ndarray:
  """Reads and validates one recording.

  Args:
    path: a ``.mat``, ``.npy``, ``.csv``, ``.tsv``, ``.1D`` or ``.txt`` file.
    num_parcels: expected number of parcels; fixes the orientation (see the
      module docstring for the rule used when it is None).
    max_dead: constant parcels tolerated (kept; more is an error).

  Returns:
    float32 ``[time, parcels]``.

  Raises:
    RecordingError: the file is missing/unreadable, not 2-D, empty,
      non-numeric, has NaN/inf values, a constant parcel, or no axis of
      length ``num_parcels``. The message names the file.
  """
  path = os.fspath(path)
  ext = extension(path)
  if ext is None:
    raise RecordingError(
        path, f"unsupported file type (supported: {', '.join(SUPPORTED_EXTENSIONS)})")
  if not os.path.exists(path):
    raise RecordingError(path, "file not found")
  if not os.path.isfile(path):
    raise RecordingError(path, "not a regular file")
  if not os.access(path, os.R_OK):
    raise RecordingError(path, "file is not readable (permission denied)")
  if ext == ".mat":
    raw = _read_mat(path)
  elif ext == ".npy":
    raw = _read_npy(path)
  elif ext == ".csv":
    raw = _read_delimited(path, ",")
  elif ext == ".tsv":
    raw = _read_delimited(path, "\t")
  else:
    raw = _read_whitespace(path)
  return validate(path, raw, ext, num_parcels, max_dead)


def _tr_ratio(tr: float, target_tr: float) -> fractions.Fraction:
  return fractions.Fraction(float(tr) / float(target_tr)).limit_denominator(100)


def resampled_length(num_timepoints: int, tr: float, target_tr: float) -> int:
  """Timepoints `resample_tr` returns: ``ceil(num_timepoints * tr / target_tr)``, exactly."""
  ratio = _tr_ratio(tr, target_tr)
  return -(-int(num_timepoints) * ratio.numerator // ratio.denominator)


def resample_tr(signal: np.ndarray, tr: float, target_tr: float,
                path: PathLike = "signal") -> np.ndarray:
  """Resamples ``[time, parcels]`` sampled every `tr` s to every `target_tr` s.

  Polyphase filtering (`scipy.signal.resample_poly`, whose anti-aliasing low-pass matters when
  going to a longer TR) by the rational ratio ``tr / target_tr`` (denominator <= 100). Each
  parcel's least-squares line is taken out first and put back at the new times: the filter's
  phases differ slightly in DC gain, which on a raw BOLD baseline (~1e4) would leave ripples of
  the size of the fluctuations, and a zero-padded baseline would ring at the edges. The output
  covers the same duration: `resampled_length` samples. Returns float32.

  Raises:
    RecordingError naming `path` if a TR is not a positive number.
  """
  from scipy import signal as sps  # pylint: disable=import-outside-toplevel
  if not (tr and np.isfinite(tr) and tr > 0 and target_tr and np.isfinite(target_tr)
          and target_tr > 0):
    raise RecordingError(path, f"cannot resample from TR {tr!r} to TR {target_tr!r} s: both "
                         "must be known and positive (a TR missing from the header or "
                         "manifest can be given with --tr)")
  ratio = _tr_ratio(tr, target_tr)
  if ratio == 1:
    return np.asarray(signal, np.float32)
  x = np.asarray(signal, np.float64)
  middle = (len(x) - 1) * float(tr) / 2
  line = lambda n, step: np.stack(  # noqa: E731  [n, 2] design of a line at times i * step
      [np.ones(n), np.arange(n) * step - middle], axis=1)
  coef = np.linalg.lstsq(line(len(x), float(tr)), x, rcond=None)[0]  # [2, parcels]
  out = sps.resample_poly(x - line(len(x), float(tr)) @ coef, ratio.numerator,
                          ratio.denominator, axis=0)
  return (out + line(len(out), float(target_tr)) @ coef).astype(np.float32)


def load_coordinates(path: PathLike, *, with_labels: bool = False):
  """Reads parcel coordinates (e.g. ``A424_Coordinates.dat``), one parcel per row, in order.

  The last three columns of each row are ``x y z``; columns before them (a label, a name) are
  ignored, so ``label x y z`` (BrainLM's A424 file), ``x y z`` (``np.savetxt`` of nilearn's
  cut coordinates) and ``label,name,R,A,S`` (Schaefer's centroid CSVs) all work. Columns are
  split on commas, else tabs, else whitespace; one header row (its last three fields not
  numbers, e.g. ``R,A,S``), blank lines and ``#`` comments are skipped.

  Returns:
    float32 ``[parcels, 3]``; with `with_labels`, ``(labels, xyz)`` where labels are the
    first column's integers when rows have 4+ columns and it holds integers, else None.

  Raises:
    RecordingError: missing/unreadable file, too few or inconsistent columns, non-numeric
      or non-finite coordinates, or no rows.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise RecordingError(path, "coordinate file not found")
  try:
    with open_text(path) as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise RecordingError(path, f"cannot read coordinate file ({e})") from e
  coords, first = [], []  # xyz rows; each row's first field (a label?) when it has 4+
  width = None
  header_seen = False
  for i, line in enumerate(lines, start=1):
    text = line.split("#", 1)[0].strip()
    if not text:
      continue
    delimiter = "," if "," in text else ("\t" if "\t" in text else None)
    fields = [f.strip() for f in text.split(delimiter)]
    if len(fields) < 3:
      raise RecordingError(
          path, f"line {i} has {len(fields)} column(s); expected 'x y z' as the last "
          "three (e.g. 'label x y z')")
    xyz = [parse_float(f) for f in fields[-3:]]
    if all(v is None for v in xyz) and not coords and not header_seen:
      header_seen = True  # e.g. 'ROI Label,ROI Name,R,A,S'
      continue
    if width is None:
      width = len(fields)
    elif len(fields) != width:
      raise RecordingError(path, f"line {i} has {len(fields)} columns, expected {width}")
    if any(v is None for v in xyz):
      raise RecordingError(path, f"non-numeric coordinate at line {i}: {line.strip()!r}")
    if not all(np.isfinite(xyz)):
      raise RecordingError(path, f"non-finite coordinate at line {i}: {line.strip()!r}")
    coords.append(xyz)
    first.append(parse_float(fields[0]) if len(fields) >= 4 else None)
  if not coords:
    raise RecordingError(path, "no coordinate rows")
  xyz = np.asarray(coords, dtype=np.float32)
  if not with_labels:
    return xyz
  labels = None
  if all(v is not None and float(v).is_integer() for v in first):
    labels = np.asarray(first, np.float64).astype(np.int64)
  return labels, xyz
