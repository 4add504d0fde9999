"""Run files on a local disk or in a bucket: the one path library of workdirs and checkpoints.

  workdir = storage.resolve("gs://bucket/runs/tiny")     a local path is made absolute
  storage.makedirs(workdir)
  storage.write_text(storage.join(workdir, "config.json"), text)
  with storage.open_file(storage.join(workdir, "metrics.jsonl"), "a") as f: ...

A workdir (and a transfer job's output directory) is a local path or a URI. Every file the
trainer writes or reads under it goes through here, on `etils.epath` (Orbax's own path library):
gs:// (Cloud Storage, as MaxText and big_vision take it) and the other schemes epath knows, which
it reaches through `tf.io.gfile` when TensorFlow is installed (it is a dependency), so no FUSE
mount is needed. A scheme epath does not know but TensorFlow's gfile has a filesystem for (e.g.
`ram://`, its in-memory filesystem, which the tests use) goes to `tf.io.gfile` through epath's
TensorFlow backend. `file://` URIs are local paths.

Local paths behave as they always did (the same `os` calls underneath). Orbax checkpoints need a
local directory or gs:// (TensorStore's `file` and `gcs` drivers: `CHECKPOINT_SCHEMES`). A failed
read or write raises `StorageError` (an OSError) with one line naming the path; a missing file
stays a FileNotFoundError.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import sys
from typing import IO, Iterator

from etils import epath
from etils.epath import backend as epath_backend

EPATH_SCHEMES = ("gs", "s3", "az", "hf")  # the URI schemes etils.epath has a backend for
CHECKPOINT_SCHEMES = ("gs",)  # where Orbax (TensorStore) writes besides a local directory
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
  """A run file or directory that cannot be read or written (the message names the path)."""


def scheme(path: str | os.PathLike) -> str | None:
  """'gs' for gs://bucket/x; None for a local path (and for file:// URIs)."""
  m = _URI.match(os.fspath(path))
  return None if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def is_local(path: str | os.PathLike) -> bool:
  return scheme(path) is None


def _local(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.lower().startswith("file://") else path


def _gfile_schemes() -> list[str]:
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  return [s for s in tf.io.gfile.get_registered_schemes() if s and s != "file"]


def resolve(path: str | os.PathLike) -> str:
  """The path a job works with: a local path made absolute (os.path.abspath), a URI as given
  (without a trailing '/'). ValueError, naming the schemes there are, for an unknown scheme."""
  s = scheme(path)
  if s is None:
    return os.path.abspath(_local(path))
  if s not in EPATH_SCHEMES and s not in _gfile_schemes():
    known = sorted(set(EPATH_SCHEMES) | set(_gfile_schemes()))
    raise ValueError(f"{os.fspath(path)}: no filesystem for '{s}://' (a local path or one of "
                     f"{', '.join(k + '://' for k in known)})")
  path = os.fspath(path)
  return path.rstrip("/") if len(path.rstrip("/")) > len(s) + 3 else path


def join(path: str | os.PathLike, *parts: str) -> str:
  return (os.path.join(_local(path), *parts) if is_local(path)
          else posixpath.join(os.fspath(path), *parts))


def dirname(path: str | os.PathLike) -> str:
  return (os.path.dirname(_local(path)) if is_local(path)
          else posixpath.dirname(os.fspath(path).rstrip("/")))


def basename(path: str | os.PathLike) -> str:
  return (os.path.basename(os.path.normpath(_local(path))) if is_local(path)
          else posixpath.basename(os.fspath(path).rstrip("/")))


class _GfilePath:
  """The epath.Path methods used here, for a scheme only tf.io.gfile has (epath's TF backend)."""

  def __init__(self, path: str):
    self.path, self.name = path, posixpath.basename(path.rstrip("/"))
    self._fs = epath_backend.tf_backend

  def exists(self) -> bool:
    return self._fs.exists(self.path)

  def is_dir(self) -> bool:
    return self._fs.isdir(self.path)

  def iterdir(self) -> Iterator["_GfilePath"]:
    return (_GfilePath(posixpath.join(self.path, n)) for n in self._fs.listdir(self.path))

  def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
    (self._fs.makedirs if parents else self._fs.mkdir)(self.path, exist_ok=exist_ok)

  def open(self, mode: str = "r"):
    if mode.startswith("w") and self._fs.exists(self.path):  # TensorFlow's ram:// appends on
      self._fs.remove(self.path)  # 'w' to a file that exists (gs:// replaces it)
    return self._fs.open(self.path, mode)

  def rename(self, target: str) -> None:
    self._fs.rename(self.path, target)


def _path(path: str | os.PathLike):
  s = scheme(path)
  if s is not None and s not in EPATH_SCHEMES:
    return _GfilePath(os.fspath(path))
  return epath.Path(_local(path))


def is_io_error(e: BaseException) -> bool:
  """An OSError, or a tf.errors.OpError (what tf.io.gfile raises on gs://: permission, bucket
  not found, ...)."""
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  return isinstance(e, OSError) or (errors is not None and isinstance(e, errors.OpError))


@contextlib.contextmanager
def _clear_errors(what: str, path: str | os.PathLike):
  """Turns a filesystem error (OSError, tf.errors) into one StorageError line naming `path`; a
  FileNotFoundError stays one (naming `path` where its message does not)."""
  try:
    yield
  except FileNotFoundError as e:
    if os.fspath(path) in str(e):
      raise
    raise FileNotFoundError(f"{os.fspath(path)}: no such file or directory") from e
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not is_io_error(e):
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise StorageError(f"{os.fspath(path)}: cannot {what}: {type(e).__name__}: "
                       f"{message}") from e


def exists(path: str | os.PathLike) -> bool:
  with _clear_errors("check it", path):
    return _path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  with _clear_errors("check it", path):
    return _path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  return exists(path) and not isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
  with _clear_errors("list it", path):
    return sorted(p.name for p in _path(path).iterdir())


def makedirs(path: str | os.PathLike) -> None:
  with _clear_errors("create the directory", path):
    _path(path).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def open_file(path: str | os.PathLike, mode: str = "r") -> Iterator[IO]:
  """The file (UTF-8 text, or bytes with 'b' in `mode`); modes r, w, a (+ b)."""
  with _clear_errors("read it" if mode.startswith("r") else "write it", path):
    with _path(path).open(mode) as f:
      yield f


def read_text(path: str | os.PathLike) -> str:
  with open_file(path, "r") as f:
    return f.read()


def write_text(path: str | os.PathLike, text: str) -> None:
  with open_file(path, "w") as f:
    f.write(text)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or directory (locally shutil.move; in a bucket the backend's rename)."""
  with _clear_errors(f"move it to {os.fspath(dst)}", src):
    if is_local(src) and is_local(dst):
      shutil.move(_local(src), _local(dst))
    else:
      _path(src).rename(os.fspath(dst))
