"""Cohort folders: recordings below a folder, and beside them a phenotype table and a TR table.

  cohort = detect("../shared/data/abide_cc200")      # None if the folder holds no such table
  cohort.describe()                                   # what was found, for logs and reports
  cohort.match(path) -> "Pitt_0050003"                # the table's id for a recording file
  cohort.subject(path) -> "50003"                     # its subject column's value, else the id
  cohort.row(path), cohort.site(path), cohort.tr(path)

Layout (ABIDE's as distributed; any cohort laid out like it):

  DIR/Phenotypic_V1_0b_preprocessed1.csv   one row per subject (or recording); an id column whose
                                           values start the recordings' file names (FILE_ID)
  DIR/site_tr.csv                          optional: site -> repetition time (s)
  DIR/rois_cc200/Pitt_0050003_rois_cc200.npy ...

Detection: every .csv/.tsv directly in DIR is read; the phenotype table is the one with a column
whose values name the most recordings (a value names a file when it equals the file name's
first `_`/`.`-separated tokens, ignoring case and a BIDS 'sub-' prefix); the subject column is
the first of SUBJECT_COLUMNS (subject / SUB_ID / participant_id / ...) other than the id column
(a table of scans names several scans of one subject; without one, the id is the subject); the
site column is the first of SITE_ID / site / SITE / site_id / Site; the TR comes from a TR column
of the phenotype table (TR / RepetitionTime / repetition_time), else from a table whose other
column holds the site names. Every choice can be given instead (`phenotypes=`, `id_column=`,
`subject_column=`, `site_column=`, `tr_table=`, `tr_column=`). Missing values (`-9999`, empty,
NA) are missing (phenotypes.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Sequence

from brainlm_jax.data import phenotypes as phen

__all__ = ["Cohort", "detect", "SITE_COLUMNS", "SUBJECT_COLUMNS", "TR_COLUMNS"]

SUBJECT_COLUMNS = ("subject", "SUB_ID", "participant_id", "subject_id", "Subject", "SubjectID",
                   "sub_id")
SITE_COLUMNS = ("SITE_ID", "site", "SITE", "site_id", "Site", "SiteID")
TR_COLUMNS = ("TR", "tr", "RepetitionTime", "repetition_time", "Repetition_Time")
MIN_MATCHED = 0.5  # a table is the phenotype table if its id column names this share of files


def _key(text: str) -> str:
  return phen.norm_subject(text).lower()


def _prefixes(path: str) -> list[str]:
  """Candidate ids of a file: its name's first 1, 2, ... `_`/`.`-separated tokens, longest
  first (lower case, 'sub-' kept off)."""
  name = os.path.basename(os.fspath(path))
  parts = re.split(r"([_.])", name)
  out = ["".join(parts[:i]) for i in range(1, len(parts) + 1, 2)]
  return [_key(p) for p in reversed(out) if p]


def _tables(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith((".csv", ".tsv")) and not f.startswith("."))


@dataclasses.dataclass
class Cohort:
  """A phenotype table joined to recording files (see the module docstring)."""

  root: str
  phenotypes: str
  id_column: str
  rows: dict[str, dict[str, str]]  # lower-case id -> {column: value} (missing values left out)
  ids: dict[str, str]  # lower-case id -> the id as written
  site_column: str | None = None
  tr_column: str | None = None
  tr_table: str | None = None
  site_tr: dict[str, float] = dataclasses.field(default_factory=dict)
  subject_column: str | None = None

  def match(self, path: str) -> str | None:
    """The table id that names `path` (longest matching prefix of its file name), or None."""
    for key in _prefixes(path):
      if key in self.rows:
        return self.ids[key]
    return None

  def row(self, path: str) -> dict[str, str]:
    key = self.match(path)
    return {} if key is None else self.rows[_key(key)]

  def subject(self, path: str) -> str | None:
    """The subject of `path`: its row's subject column value, else the table id that names the
    file (None when no row names it)."""
    key = self.match(path)
    if key is None:
      return None
    value = self.rows[_key(key)].get(self.subject_column) if self.subject_column else None
    return value or key

  def site(self, path: str) -> str | None:
    return self.row(path).get(self.site_column) if self.site_column else None

  def tr(self, path: str) -> float | None:
    """Repetition time (s) of `path`: the phenotype TR column, else the site's in the TR table."""
    row = self.row(path)
    if self.tr_column and phen.as_float(row.get(self.tr_column)):
      return phen.as_float(row[self.tr_column])
    site = row.get(self.site_column) if self.site_column else None
    return self.site_tr.get(site.strip().lower()) if site else None

  def describe(self, paths: Sequence[str] = ()) -> list[str]:
    """Lines saying what was found (and, given the recordings, how many the table names)."""
    lines = [f"phenotype table {self.phenotypes} ({len(self.rows)} rows; id column "
             f"{self.id_column!r}; site column {self.site_column!r})"]
    lines.append(f"subject ids from the column {self.subject_column!r}" if self.subject_column
                 else f"subject ids: the id column {self.id_column!r} (no subject column)")
    if self.tr_column:
      lines.append(f"TR from the phenotype column {self.tr_column!r}")
    elif self.tr_table:
      lines.append(f"TR table {self.tr_table} ({len(self.site_tr)} sites)")
    else:
      lines.append("no TR table or column: recordings keep their own TR (unknown)")
    if paths:
      named = sum(self.match(p) is not None for p in paths)
      lines.append(f"{named} of {len(paths)} recordings named in the phenotype table")
    return lines


def _best_id_column(header: list[str], rows: list[list[str]],
                    paths: Sequence[str]) -> tuple[str | None, int]:
  """The column whose values start the most file names; among equals, the one that tells the
  most files apart (an id, not a site that also starts the names: ABIDE's SITE_ID and
  FILE_ID both match `OHSU_0050142_rois_cc200.1D`). Returns (column, files matched)."""
  prefixes = [set(_prefixes(p)) for p in paths]
  best, best_score = None, (0, 0)
  for j, col in enumerate(header):
    values = {_key(r[j]) for r in rows if j < len(r) and r[j].strip()}
    if len(values) < 2:
      continue
    matched = [pre & values for pre in prefixes]
    score = (sum(map(bool, matched)), len(set().union(*matched)))
    if score > best_score:
      best, best_score = col, score
  return best, best_score[0]


def _read_site_tr(path: str, sites: Iterable[str]) -> dict[str, float] | None:
  """{site (lower case): TR} from a 2+-column table with a TR column whose other column holds
  the site names; None if `path` is no such table."""
  header, rows = phen.read_table(path, "TR table")
  tr_col = next((c for c in TR_COLUMNS if c in header), None)
  if tr_col is None:
    return None
  ti = header.index(tr_col)
  sites = {s.strip().lower() for s in sites}
  for j, _ in enumerate(header):
    if j == ti:
      continue
    out = {r[j].strip().lower(): phen.as_float(r[ti]) for r in rows
           if max(j, ti) < len(r) and phen.as_float(r[ti])}
    if out and (not sites or set(out) & sites):
      return out
  return None


def detect(directory: str, paths: Sequence[str], *, phenotypes: str | None = None,
           id_column: str | None = None, site_column: str | None = None,
           tr_table: str | None = None, tr_column: str | None = None,
           subject_column: str | None = None) -> Cohort | None:
  """The cohort of `directory` (whose recordings are `paths`), or None when no table there
  names at least half of them (and none was given). Raises ValueError (naming the file and
  its columns) when a given table or column does not fit."""
  candidates = [phenotypes] if phenotypes else (
      _tables(directory) if os.path.isdir(directory) else [])
  chosen = None
  for table in candidates:
    try:
      header, rows = phen.read_table(table)
    except (OSError, ValueError, UnicodeDecodeError):
      if phenotypes:
        raise
      continue
    if id_column:
      if id_column not in header:
        if not phenotypes:
          continue
        raise ValueError(f"{table}: no id column {id_column!r}; columns: {', '.join(header)}")
      col, n = id_column, None
    else:
      col, n = _best_id_column(header, rows, paths)
    if col is None:
      if phenotypes:
        raise ValueError(f"{table}: no column names the recordings (file names e.g. "
                         f"{[os.path.basename(p) for p in paths[:3]]}); give the id column")
      continue
    if n is not None and not phenotypes and n < MIN_MATCHED * max(len(paths), 1):
      continue
    if chosen is None or (n or 0) > chosen[3]:
      chosen = (table, header, rows, n or 0, col)
  if chosen is None:
    return None
  table, header, rows, _, col = chosen
  j = header.index(col)
  by_id: dict[str, dict[str, str]] = {}
  ids: dict[str, str] = {}
  for r in rows:
    if j < len(r) and r[j].strip():
      key = _key(r[j])
      ids.setdefault(key, r[j].strip())
      by_id.setdefault(key, {h: v.strip() for h, v in zip(header, r) if not phen.is_missing(v)})
  if site_column and site_column not in header:
    raise ValueError(f"{table}: no site column {site_column!r}; columns: {', '.join(header)}")
  site_column = site_column or next((c for c in SITE_COLUMNS if c in header), None)
  if subject_column and subject_column not in header:
    raise ValueError(f"{table}: no subject column {subject_column!r}; columns: "
                     f"{', '.join(header)}")
  subject_column = subject_column or next(
      (c for c in SUBJECT_COLUMNS if c in header and c != col), None)
  if tr_column and tr_column not in header:
    raise ValueError(f"{table}: no TR column {tr_column!r}; columns: {', '.join(header)}")
  tr_column = tr_column or (None if tr_table else next((c for c in TR_COLUMNS if c in header),
                                                       None))
  cohort = Cohort(root=directory, phenotypes=table, id_column=col, rows=by_id, ids=ids,
                  site_column=site_column, tr_column=tr_column, subject_column=subject_column)
  if not tr_column:
    sites = {row.get(site_column, "") for row in by_id.values()} if site_column else set()
    for path in [tr_table] if tr_table else [t for t in _tables(directory) if t != table]:
      site_tr = _read_site_tr(path, sites - {""})
      if site_tr:
        cohort.tr_table, cohort.site_tr = path, site_tr
        break
      if tr_table:
        raise ValueError(f"{tr_table}: not a TR table (needs a column named one of "
                         f"{', '.join(TR_COLUMNS)} and a column of site names)")
  return cohort


def subject_values(data: str, recordings: Sequence, column: str,
                   table: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
  """({subject: value of `column`}, where they came from) for `recordings` (with `.path` and
  `.subject`): from `table` ({normalised subject: value}, a phenotype file already read), else
  from the phenotype table of the cohort folder `data` (or the folder of the file `data`).
  Raises ValueError naming the table and its columns when nothing has a value."""
  if table is not None:
    return ({r.subject: table[phen.norm_subject(r.subject)] for r in recordings
             if phen.norm_subject(r.subject) in table}, "phenotype file")
  folder = data if os.path.isdir(data) else os.path.dirname(data)
  group = detect(folder, [r.path for r in recordings])
  if group is None:
    raise ValueError(f"{data}: no phenotype table beside the recordings names them; pass "
                     f"--phenotypes FILE (with a {column!r} column)")
  values: dict[str, str] = {}
  for r in recordings:
    v = group.row(r.path).get(column)
    if v is not None:
      values.setdefault(r.subject, v)
  if not values:
    columns = sorted({c for row in group.rows.values() for c in row})
    raise ValueError(f"{group.phenotypes}: no recording has a {column!r} value; "
                     f"columns: {', '.join(columns)}")
  return values, f"{group.phenotypes} (column {column!r})"
