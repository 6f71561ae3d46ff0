"""Filesystem primitives the registry's guarantees rest on.

- ``write_json_atomic``: temp file in the same directory, fsync, ``os.replace`` — a reader sees
  the old file or the new one, never a torn write.
- ``locked``: an ``fcntl.flock`` on a lock file, so read-modify-write of a small file (the
  aliases) is serialised across processes, not just threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def json_default(value: Any) -> Any:
    """Make numpy scalars/arrays and objects with ``to_dict`` JSON-serialisable in manifests."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dump_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` and fsync it (used for files inside a not-yet-visible dir)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically (see :func:`write_bytes_atomic`)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=json_default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically: a same-directory temp file, fsynced, then
    ``os.replace`` (a reader sees the old bytes or the new, never part). Raises FileNotFoundError
    when ``path``'s folder does not exist (or vanished meanwhile); the temp file never stays."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (a rename) on filesystems that need it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (created if absent) for the with-block."""
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
