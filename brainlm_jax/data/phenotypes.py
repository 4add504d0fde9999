"""Phenotype tables: one row per subject (or recording), joined to recordings by subject id.

  read_phenotypes(path, subject_column, target) -> {subject: value}     one column
  read_rows(path, subject_column) -> {subject: {column: value}}         every column

CSV/TSV (delimiter from the suffix, else sniffed). Missing values (empty, NA, n/a, nan, ...,
and the numeric code -9999 of ABIDE and other consortia) are left out, never read as numbers. Subjects are compared with any BIDS 'sub-' prefix removed
(`norm_subject`).
"""

from __future__ import annotations

import csv
import math
import os

from absl import logging

__all__ = ["MISSING", "as_float", "is_missing", "norm_subject", "read_phenotypes", "read_rows",
           "read_table"]

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
MISSING_CODES = frozenset({-9999.0, -999.0})  # numeric "no value" codes (ABIDE, 1000 FCP)


def norm_subject(s: str) -> str:
  """A subject id without a BIDS 'sub-' prefix or surrounding blanks."""
  s = str(s).strip()
  return s[4:] if s.lower().startswith("sub-") else s


def as_float(v) -> float | None:
  """The finite number `v` spells, else None."""
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def is_missing(value: str) -> bool:
  text = str(value).strip().lower()
  return text in MISSING or as_float(text) in MISSING_CODES


def read_table(path: str, what: str = "phenotype file") -> tuple[list[str], list[list[str]]]:
  """(header, data rows) of a CSV/TSV; blank lines dropped. Raises FileNotFoundError /
  ValueError naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: {what} not found")
  with open(path, "r", encoding="utf-8-sig", newline="") as f:
    text = f.read()
  lower = path.lower()
  if lower.endswith((".tsv", ".tab")):
    delimiter = "\t"
  elif lower.endswith(".csv"):
    delimiter = ","
  else:
    try:
      delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",\t;").delimiter
    except csv.Error:
      delimiter = ","
  rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter)
          if any(c.strip() for c in r)]
  if not rows:
    raise ValueError(f"{path}: empty {what}")
  return [c.strip() for c in rows[0]], rows[1:]


def _column(path: str, header: list[str], column: str, what: str) -> int:
  if column not in header:
    raise ValueError(f"{path}: no {what} {column!r}; available columns: {', '.join(header)}")
  return header.index(column)


def read_phenotypes(path: str, subject_column: str, target: str) -> dict[str, str]:
  """{subject: value} of column `target`; rows with a missing value are dropped, and a subject
  listed again with another value keeps its first (with a warning). Raises ValueError naming the
  file and listing its columns when a column is missing."""
  header, rows = read_table(path)
  si = _column(path, header, subject_column, "subject column (--subject-column)")
  ti = _column(path, header, target, "target column (--target)")
  values: dict[str, str] = {}
  for line, r in enumerate(rows, start=2):
    if max(si, ti) >= len(r):
      continue
    subject, value = norm_subject(r[si]), r[ti].strip()
    if not subject or is_missing(value):
      continue
    if subject in values and values[subject] != value:
      logging.warning("%s line %d: subject %s appears again with %s=%r (kept %r)", path, line,
                      subject, target, value, values[subject])
      continue
    values.setdefault(subject, value)
  return values


def read_rows(path: str, subject_column: str) -> dict[str, dict[str, str]]:
  """{subject: {column: value}} of every row (missing values left out)."""
  header, rows = read_table(path)
  key = _column(path, header, subject_column, "subject column")
  return {norm_subject(r[key]): {h: v.strip() for h, v in zip(header, r)
                                 if h != subject_column and not is_missing(v)}
          for r in rows if key < len(r)}
