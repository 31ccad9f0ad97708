"""Crash-safe file writes: a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, IO

# mkstemp creates 0600 files; written files get the permissions a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
  """Writes `path` through a temporary file in the same folder, fsync, then `os.replace`.

  Args:
    path: destination file.
    write: called with the open temporary file.
    mode: "wb" (binary) or "w" (UTF-8 text).
  """
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def atomic_copy(src: str, dst: str) -> None:
  """Copies file `src` to `dst` as `atomic_write` writes: `dst` is either old or complete."""
  import shutil  # pylint: disable=g-import-not-at-top
  with open(src, "rb") as f:
    atomic_write(dst, lambda g: shutil.copyfileobj(f, g, 1 << 20), mode="wb")
