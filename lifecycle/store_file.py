"""``FileStore``: the state store on the data folder (one machine; see ``store`` for the guarantees)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from headfleet.atomic import fsync_dir, write_bytes_atomic
from headfleet.errors import BackendError, ValidationError
from headfleet.lifecycle.store import LOCKS_DIR, SUFFIX, _check_prefix, _check_value, check_key
from headfleet.names import NAME_RE


class FileStore:
    """One file per key under ``root`` (normally ``Settings.layout.monitor``).

    ``root`` need not exist: reads see an empty store, the first ``put`` (or ``lock``) creates
    it. Files are written private to the user (mode 0600): feedback holds tenants' texts.
    ``errors`` counts calls that raised ``BackendError``.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.errors = 0
        self._count = threading.Lock()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- paths and failures -----------------------------------------------------------------

    def _file(self, parts: tuple[str, ...], base: Path | None = None) -> Path:
        return (base or self.root).joinpath(*parts[:-1], parts[-1] + SUFFIX)

    @contextlib.contextmanager
    def _failures(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            with self._count:
                self.errors += 1
            raise BackendError(
                f"monitoring state store: {op} {key!r} under {self.root} failed "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def _makedirs(self, folder: Path) -> None:
        """``mkdir -p`` that fsyncs each new entry's parent, so a new folder survives a crash."""
        missing: list[Path] = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            fsync_dir(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove ``folder`` and its parents while they are empty, stopping at the root."""
        root = self.root
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone / being written): stop here
                return
            folder = folder.parent
        with contextlib.suppress(OSError):
            fsync_dir(folder)

    # -- StateStore ---------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        path = self._file(check_key(key))
        with self._failures("get", key):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except (FileNotFoundError, NotADirectoryError):
                return None

    def put(self, key: str, value: bytes) -> None:
        path = self._file(check_key(key))
        data = _check_value(value)
        with self._failures("put", key):
            for attempt in range(8):  # a concurrent delete may prune the folder between the two calls
                self._makedirs(path.parent)
                try:
                    write_bytes_atomic(path, data, mode=0o600)  # private: feedback holds tenants' texts
                    break
                except FileNotFoundError:
                    if attempt == 7:
                        raise
            fsync_dir(path.parent)

    def delete(self, key: str) -> None:
        path = self._file(check_key(key))
        with self._failures("delete", key):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
            fsync_dir(path.parent)
            self._prune(path.parent)

    def keys(self, prefix: str = "") -> list[str]:
        parts = _check_prefix(prefix)
        found: list[str] = []
        with self._failures("keys", prefix):
            if parts and self._file(parts).is_file():
                found.append("/".join(parts))
            top = self.root.joinpath(*parts)
            # os.walk skips folders that vanish under it (a concurrent delete_prefix).
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if NAME_RE.fullmatch(d)]  # skips .locks
                rel = Path(dirpath).relative_to(self.root).parts
                for name in filenames:
                    stem = name[: -len(SUFFIX)]
                    if name.endswith(SUFFIX) and NAME_RE.fullmatch(stem):
                        found.append("/".join((*rel, stem)))
        return sorted(found)

    def delete_prefix(self, prefix: str) -> int:
        parts = _check_prefix(prefix)
        if not parts:
            raise ValidationError("delete_prefix needs a prefix of at least one name; '' would delete every tenant")
        removed = 0
        with self._failures("delete_prefix", prefix):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self._file(parts).unlink()
                removed += 1
            top = self.root.joinpath(*parts)
            for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
                for name in filenames:  # values, and temp files a crashed put left behind
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except FileNotFoundError:  # another deleter got it first: not ours to count
                        continue
                    removed += name.endswith(SUFFIX)
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            self._prune(top.parent)
        return removed

    @contextlib.contextmanager
    def lock(self, key: str, timeout_s: float = 10.0) -> Iterator[None]:
        path = self._file(check_key(key), self.root / LOCKS_DIR)
        with self._failures("lock", key):
            self._makedirs(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with self._failures("lock", key):
                self._acquire(fd, key, timeout_s)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, key: str, timeout_s: float) -> None:
        """``flock`` ``fd`` exclusively, polling (1 ms doubling to 50 ms) until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    with self._count:
                        self.errors += 1
                    raise BackendError(
                        f"monitoring state store: lock {key!r} under {self.root} still held by "
                        f"another process after {timeout_s:g}s"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def close(self) -> None:
        pass

