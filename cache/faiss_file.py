"""The local FAISS store's files: one SQLite database that every process on the folder appends to.

Layout, for the store path ``P`` a caller passes (``cache/local-<fp>.faiss.npz`` in the engine):

    P.sqlite        ``P`` with its ``.npz`` suffix swapped: the live store, in WAL mode
                    (SQLite keeps ``-wal`` and ``-shm`` files beside it while it is open)
    P.sqlite.lock   flock target while a process opens, checks and migrates the store
    P               a format-1 ``.npz`` snapshot written before this format: migrated, then removed
                    (read by ``faiss_legacy``)

The folder must be on a local filesystem: SQLite's WAL index is shared memory, and it and
``flock`` do not work across machines over NFS.

Schema: ``entries(seq INTEGER PRIMARY KEY AUTOINCREMENT, fid INTEGER UNIQUE, key BLOB,
namespace TEXT, vector BLOB)`` holding one row per faiss id, and ``meta(name, value)`` with
the format, the width and the backbone fingerprint.

Guarantees and how they are kept:
- A committed batch is whole and durable: each batch is one transaction, and with
  ``synchronous=FULL`` a commit fsyncs the write-ahead log before it returns, so it survives
  kill -9 of the writer (and power loss, on a disk that honours fsync).
- A torn write is never read: WAL frames carry cumulative checksums and a commit marker. When
  the first connection opens after a crash, SQLite rebuilds its index of the WAL and keeps
  only complete, checksummed transactions, so a batch cut by kill -9 (or garbage after it) is
  dropped whole and every batch before it is intact.
- No process erases another's rows: nothing rewrites the file. A write is an
  ``INSERT OR REPLACE`` of its own rows only; SQLite lets one writer at a time in (a file lock
  it takes and releases around each transaction), so concurrent writers interleave whole
  batches, and a row is replaced only by a later put of the same faiss id.
- Readers follow writers by sequence number: ``seq`` is assigned under the write lock and
  never reused, so commits become visible in ``seq`` order and "every row with seq > s" is
  exactly what a reader that has seen up to ``s`` is missing. A replaced row comes back with a
  new ``seq``. Readers never block the writer (WAL).
- A row is checked before it is handed out (16-byte key, id derived from that key, vector of
  exactly ``dim`` float32); a malformed row is skipped and counted, never loaded.
- A file that is not a store of this width and backbone (another backbone's, or not a SQLite
  file at all) is moved aside to ``<stem>.discarded-<ns><suffix>``, never deleted; the store
  then starts empty. Opening, checking and migrating run under an flock, so two processes starting
  together neither both migrate nor move aside a file the other has just created.
- A format-1 snapshot is migrated with ``INSERT OR IGNORE`` in batches (rows already in the
  database are newer and win), then removed; a crash mid-way repeats the migration harmlessly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from headfleet import atomic

from .faiss_legacy import legacy_rows, read_snapshot
from .keys import key_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MIGRATE_BATCH_ROWS = 8192

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    fid INTEGER NOT NULL UNIQUE,
    key BLOB NOT NULL,
    namespace TEXT NOT NULL,
    vector BLOB NOT NULL
);
"""


class StorePaths(NamedTuple):
    """Where one store's files live (see the module docstring)."""

    db: Path
    lock: Path
    legacy: Path | None  # a format-1 snapshot to migrate, when the caller's path names one

    @classmethod
    def of(cls, path: Path) -> "StorePaths":
        path = Path(path)
        if path.suffix == ".sqlite":
            return cls(path, path.with_name(path.name + ".lock"), None)
        db = path.with_suffix(".sqlite") if path.suffix == ".npz" else path.with_name(path.name + ".sqlite")
        return cls(db, db.with_name(db.name + ".lock"), path)


class Rows(NamedTuple):
    """A run of store rows in commit order, already checked."""

    seqs: np.ndarray  # [n] int64, ascending
    ids: np.ndarray  # [n] int64, faiss ids
    keys: list[bytes]  # n 16-byte content keys
    namespaces: list[str]  # n
    vectors: np.ndarray  # [n, dim] float32
    last_seq: int  # the highest seq scanned, malformed rows included (the next read starts after it)
    scanned: int  # rows read from the file, malformed ones included
    skipped: int  # malformed rows left out


class UnusableFile(ValueError):
    """The file is not a store of this width and backbone; it is moved aside, never loaded."""


class StoreFile:
    """One process's connections to a store database: a writer for ``append``, a reader for
    ``rows_after``. Both methods are thread-safe (each connection has its own lock).

    Build with :meth:`open`. ``discarded`` counts files moved aside on open (a database or a
    format-1 snapshot that is unreadable or belongs to another backbone / width);
    ``migrated`` counts rows taken over from a format-1 snapshot.
    """

    def __init__(self, paths: StorePaths, dim: int, fingerprint: str, busy_timeout_s: float):
        self.paths = paths
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.busy_timeout_s = float(busy_timeout_s)
        self.discarded = 0
        self.migrated = 0
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, dim: int, fingerprint: str, *, busy_timeout_s: float = 10.0) -> "StoreFile":
        """Open (creating it if needed) the store for ``path``, migrating a format-1 snapshot.

        Raises ``OSError`` when the folder or the database cannot be created or locked
        (permissions, a file where the folder should be, ``busy_timeout_s`` passed waiting).
        A bad *file* never raises: it is moved aside, counted in ``discarded`` and logged.
        """
        paths = StorePaths.of(path)
        self = cls(paths, dim, fingerprint, busy_timeout_s)
        try:
            paths.db.parent.mkdir(parents=True, exist_ok=True)
            with atomic.locked(paths.lock):
                try:
                    self._connect()
                except UnusableFile as exc:
                    self.close()
                    aside = _set_aside(paths.db, with_sidecars=True)
                    self.discarded += 1
                    log.warning("ignoring local store %s: %s; moved it to %s and starting empty",
                                paths.db, exc, aside.name)
                    self._connect()
                if paths.legacy is not None and paths.legacy.is_file():
                    self._migrate(paths.legacy)
        except sqlite3.Error as exc:
            self.close()
            raise OSError(f"cannot open the local store {paths.db}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self) -> None:
        """Open both connections, create the schema on a new file and check ``meta``."""
        try:
            self._writer = self._connection()
            self._writer.executescript(_SCHEMA)
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany(
                    "INSERT OR IGNORE INTO meta(name, value) VALUES (?, ?)",
                    [("format", str(FORMAT_VERSION)), ("dim", str(self.dim)), ("fingerprint", self.fingerprint)],
                )
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            meta = dict(self._writer.execute("SELECT name, value FROM meta").fetchall())
            self._reader = self._connection()
        except sqlite3.OperationalError:
            raise  # locked, unwritable, out of space: the place is the problem, not the file
        except sqlite3.DatabaseError as exc:  # not a database, or a corrupt one
            raise UnusableFile(str(exc)) from exc
        want = {"format": str(FORMAT_VERSION), "dim": str(self.dim), "fingerprint": self.fingerprint}
        if meta != want:
            raise UnusableFile(f"file holds {meta}, expected {want}")

    def _connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.paths.db, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot put {self.paths.db} in WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, legacy: Path) -> None:
        """Take the rows of a format-1 snapshot over, then remove it (moved aside if unusable)."""
        try:
            ids, keys, namespaces, vectors = legacy_rows(read_snapshot(legacy), self.dim, self.fingerprint)
        except Exception as exc:
            aside = _set_aside(legacy)
            self.discarded += 1
            log.warning("ignoring FAISS store snapshot %s: %s; moved it to %s", legacy, exc, aside.name)
            return
        for start in range(0, len(keys), MIGRATE_BATCH_ROWS):
            stop = start + MIGRATE_BATCH_ROWS
            self.append(ids[start:stop], keys[start:stop], namespaces[start:stop], vectors[start:stop],
                        replace=False)
        os.unlink(legacy)
        fsync_dir(legacy.parent)
        self.migrated = len(keys)
        log.info("migrated %d vectors from %s into %s", len(keys), legacy, self.paths.db)

    # -- writing -------------------------------------------------------------------------------

    def append(self, ids: np.ndarray, keys: list[bytes], namespaces: list[str], vectors: np.ndarray,
               *, replace: bool = True) -> tuple[int, int]:
        """Commit one batch as one transaction; returns ``(lo, hi)``: its rows have ``lo < seq <= hi``.

        ``ids``: [n] int64 distinct faiss ids; ``keys``: n 16-byte keys; ``vectors``: [n, dim]
        float32. ``replace=False`` keeps a row already held for an id (migration). Returns once
        the commit is on disk; raises ``sqlite3.Error`` (nothing of the batch is then stored)
        when the file is locked past ``busy_timeout_s``, unwritable or full.
        """
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (len(keys), self.dim) or len(ids) != len(keys) or len(namespaces) != len(keys):
            raise ValueError("ids, keys, namespaces and vectors [n, dim] must have one entry per row")
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        rows = [(int(f), k, ns, v.tobytes()) for f, k, ns, v in zip(ids.tolist(), keys, namespaces, vectors)]
        with self._wlock:
            conn = self._require(self._writer)
            conn.execute("BEGIN IMMEDIATE")
            try:
                lo = _last_seq(conn)
                conn.executemany(f"{verb} INTO entries(fid, key, namespace, vector) VALUES (?, ?, ?, ?)", rows)
                hi = _last_seq(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        return lo, hi

    # -- reading -------------------------------------------------------------------------------

    def rows_after(self, seq: int, limit: int) -> Rows:
        """Up to ``limit`` rows with ``seq`` greater than the given one, in commit order, checked.

        Raises ``sqlite3.Error`` when the file cannot be read (its state is then unchanged).
        """
        with self._rlock:
            conn = self._require(self._reader)
            raw = conn.execute(
                "SELECT seq, fid, key, namespace, vector FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(seq), int(limit)),
            ).fetchall()
        width = self.dim * 4
        good = [r for r in raw
                if isinstance(r[2], bytes) and len(r[2]) == 16 and key_id(r[2]) == r[1]
                and isinstance(r[3], str) and isinstance(r[4], bytes) and len(r[4]) == width]
        vectors = np.frombuffer(b"".join(r[4] for r in good), dtype="<f4").astype(np.float32, copy=False)
        return Rows(
            seqs=np.fromiter((r[0] for r in good), dtype=np.int64, count=len(good)),
            ids=np.fromiter((r[1] for r in good), dtype=np.int64, count=len(good)),
            keys=[r[2] for r in good],
            namespaces=[r[3] for r in good],
            vectors=vectors.reshape(len(good), self.dim),
            last_seq=int(raw[-1][0]) if raw else int(seq),
            scanned=len(raw),
            skipped=len(raw) - len(good),
        )

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close both connections (the last one to close checkpoints and removes the WAL)."""
        with self._wlock, self._rlock:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self._reader = self._writer = None

    def _require(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        if conn is None:
            raise ValueError(f"the local store file {self.paths.db} is closed")
        return conn


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
    return int(row[0]) if row else 0


def _set_aside(path: Path, *, with_sidecars: bool = False) -> Path:
    """Rename ``path`` to ``<stem>.discarded-<ns><suffix>`` (with its SQLite ``-wal`` / ``-shm``
    files, so a moved database still opens as one); returns the new path."""
    aside = path.with_name(f"{path.stem}.discarded-{time.time_ns()}{path.suffix}")
    os.replace(path, aside)
    if with_sidecars:
        for side in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path.with_name(path.name + side), aside.with_name(aside.name + side))
    fsync_dir(path.parent)
    return aside


def fsync_dir(folder: Path) -> None:
    """Make renames and unlinks in ``folder`` durable; best effort (never raises) where directories
    cannot be opened or synced."""
    with contextlib.suppress(OSError):
        atomic.fsync_dir(folder)
