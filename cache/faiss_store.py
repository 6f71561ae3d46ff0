"""The local tier: a FAISS index of cached vectors, durable and shared by every process on the folder.

The vectors and their key table live in memory (``faiss_index.KeyedIndex``: an exact-by-key,
namespace-restricted FAISS index, where a lookup whose full key differs from the stored one is
a miss, never another text's vector); this module keeps that copy in step with the file.

With a ``path``, the index is the in-memory copy of a store file (``faiss_file``: SQLite in
WAL mode) that any number of processes — the server, a CLI beside it — open together.

Guarantees and how they are kept:
- kill -9 loses at most the puts of the last ``flush_interval_s`` seconds (default 1 s), plus a
  flush that is in progress at the kill. ``put_many`` updates the index at once and queues the
  rows; a flusher thread (started at the first put) commits the queue as one transaction every
  ``flush_interval_s``, sooner once ``flush_rows`` rows wait, and the commit is fsynced before
  the rows leave the queue. ``flush_interval_s=0`` commits inside ``put_many`` instead: nothing
  is lost, and each put waits for the disk. While commits fail (disk full, the file locked past
  ``busy_timeout_s``) the rows stay queued and are retried every interval; each failure is
  logged and counted in ``flush_errors``, so the window only grows visibly.
- A batch cut by the kill is dropped whole at the next open, the batches before it load intact
  (SQLite's checksummed write-ahead log; see ``faiss_file``).
- Nothing one process writes is erased by another: every process appends its own rows; none
  ever rewrites the file. ``close`` commits the queue and closes; there is no whole-store save.
- Every process sees the others' puts: the file numbers rows in commit order, and the store
  loads the rows after the last one it has seen at each lookup miss (``get_many``), at each
  ``search``, after each flush, or on ``refresh()``. Its own committed rows are recognised by
  their numbers and not loaded twice; a put of its own still in the queue wins over an older
  row of another process for the same id. Content keys hash the backbone and the text, so two
  processes writing one key write the same vector, and which of them lands last does not matter.
- Files from before (format 1, a single ``.npz`` snapshot at ``path``) are migrated into the
  store file at open and removed; a file that cannot be used is moved aside and counted in
  ``discarded_on_load``, never deleted, and the store starts without it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .base import Entry, check_batch
from .faiss_file import StoreFile
from .faiss_index import KEY_TABLE_BYTES, KeyedIndex
from .keys import key_id

__all__ = ["FaissStore", "key_id"]

log = logging.getLogger(__name__)

READ_CHUNK_ROWS = 8192  # rows loaded from the file per query, so catching up holds little extra memory


class _Queued(NamedTuple):
    """A put not yet committed to the file."""

    key: bytes
    namespace: str
    vector: np.ndarray  # [dim] float32
    ticket: int  # increases with every put; a flush removes the entry only if it is still the one it wrote


class FaissStore:
    """Exact get/put by content key plus namespace-restricted inner-product search.

    ``dim``: vector width; ``fingerprint``: the backbone's, checked against the file;
    ``path``: where the store lives (see ``faiss_file.StorePaths``; ``None``: in memory only);
    ``flush_interval_s``: the most seconds a put waits in memory before it is committed, i.e.
    what kill -9 can lose (0: commit inside ``put_many``); ``flush_rows``: queue length that
    triggers a commit before the interval is up; ``busy_timeout_s``: how long a commit waits
    for another process's commit before it fails (and is retried).

    Raises ``OSError`` when the store file cannot be created or opened (an unwritable folder);
    a bad file is moved aside instead (``discarded_on_load``). Counters: ``collisions`` (puts
    that displaced a different key with the same 64-bit id), ``migrated_on_load`` (rows taken
    over from a format-1 snapshot), ``flush_errors`` (failed commits, rows kept and retried),
    ``read_errors`` (failed loads of other processes' rows), ``skipped_rows`` (malformed rows in
    the file, never loaded).
    """

    name = "local"
    needs_namespace = True

    def __init__(self, dim: int, fingerprint: str, path: Path | None = None, *,
                 flush_interval_s: float = 1.0, flush_rows: int = 4096, busy_timeout_s: float = 10.0):
        if dim <= 0:
            raise ValueError("dim must be positive")
        if flush_interval_s < 0 or flush_rows <= 0 or busy_timeout_s < 0:
            raise ValueError("flush_interval_s and busy_timeout_s must be >= 0, flush_rows > 0")
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.path = Path(path) if path is not None else None
        self.flush_interval_s = float(flush_interval_s)
        self.flush_rows = int(flush_rows)
        self.busy_timeout_s = float(busy_timeout_s)
        self._lock = threading.RLock()  # the index, the key table, the queue, the read position
        self._flush_lock = threading.Lock()  # one commit at a time; also guards opening / closing the file
        self._thread_lock = threading.Lock()  # starting the flusher (never held across disk I/O)
        self._index = KeyedIndex(self.dim)
        self._queue: dict[int, _Queued] = {}  # faiss id -> put not yet committed
        self._tickets = 0
        self._seen_seq = 0  # every file row with seq <= this is loaded (or is our own)
        self._own: list[tuple[int, int]] = []  # (lo, hi]: seq ranges we committed, past _seen_seq
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self.collisions = 0
        self.discarded_on_load = 0
        self.migrated_on_load = 0
        self.flush_errors = 0
        self.read_errors = 0
        self.skipped_rows = 0
        self._file: StoreFile | None = None
        if self.path is not None:
            self._file = self._open_file()
            self.discarded_on_load = self._file.discarded
            self.migrated_on_load = self._file.migrated
            self.refresh()

    # -- reading ---------------------------------------------------------------------------

    def get_many(self, keys: list[bytes]) -> list[Entry]:
        """One entry per key: its vector ([dim] float32) or ``None``.

        A miss first loads what other processes committed since the last look (one query on
        the store file), then asks again.
        """
        out: list[Entry] = [None] * len(keys)
        self._fill(keys, range(len(keys)), out)
        if self._file is not None and any(v is None for v in out) and self.refresh():
            self._fill(keys, [i for i, v in enumerate(out) if v is None], out)
        return out

    def _fill(self, keys: list[bytes], positions, out: list[Entry]) -> None:
        with self._lock:
            self._index.fill(keys, positions, out)

    def search(self, query: np.ndarray, k: int, namespace: str) -> list[tuple[bytes, float]]:
        """Top-``k`` keys of ``namespace`` by inner product with ``query`` ([dim] float32), best first.

        The search runs with an id selector holding only that namespace's ids, and every
        result is checked against the key table again, so another namespace's key is never
        returned even if the selector were to let one through. Other processes' rows committed
        before the call are included.
        """
        q = np.asarray(query)
        if q.dtype != np.float32 or q.shape != (self.dim,):
            raise ValueError(f"query must be float32 of shape ({self.dim},)")
        if k <= 0:
            return []
        self.refresh()
        with self._lock:
            return self._index.search(q.reshape(1, -1), k, namespace)

    def refresh(self) -> int:
        """Load the rows other processes committed since the last look; returns how many changed
        the index. A failed read is logged and counted (``read_errors``), never raised: the
        store keeps serving what it holds and reads again at the next miss."""
        applied = 0
        with self._lock:
            f = self._file
            if f is None:
                return 0
            while True:
                try:
                    rows = f.rows_after(self._seen_seq, READ_CHUNK_ROWS)
                except Exception:
                    self.read_errors += 1
                    log.exception("could not read new rows of the local store %s", f.paths.db)
                    break
                self.skipped_rows += rows.skipped
                if rows.skipped:
                    log.warning("skipped %d malformed rows in %s", rows.skipped, f.paths.db)
                applied += self._apply_rows(rows)
                self._seen_seq = rows.last_seq
                if rows.scanned < READ_CHUNK_ROWS:
                    break
            self._own = [(lo, hi) for lo, hi in self._own if hi > self._seen_seq]
        return applied

    def _apply_rows(self, rows) -> int:
        """Put file rows into the index, except our own, ids with a queued put of ours (newer),
        and rows identical to what is held (another process wrote the same text)."""
        take: dict[int, int] = {}  # faiss id -> position in rows; the later row of an id wins
        for j, (seq, fid) in enumerate(zip(rows.seqs.tolist(), rows.ids.tolist())):
            if fid in self._queue or any(lo < seq <= hi for lo, hi in self._own):
                continue
            take[fid] = j
        fids, pos = list(take.keys()), list(take.values())
        keys, namespaces, vectors = [rows.keys[j] for j in pos], [rows.namespaces[j] for j in pos], rows.vectors[pos]
        new = [i for i, same in enumerate(self._index.identical(fids, keys, namespaces, vectors)) if not same]
        if not new:
            return 0
        self._apply([fids[i] for i in new], [keys[i] for i in new], [namespaces[i] for i in new], vectors[new],
                    count_collisions=False)
        return len(new)

    # -- writing ---------------------------------------------------------------------------

    def put_many(self, keys: list[bytes], vectors: np.ndarray, namespaces: list[str]) -> None:
        """Insert or replace ``vectors`` ([n, dim] float32); within one batch the last occurrence
        of a key wins. With a path the rows are committed within ``flush_interval_s`` (at once
        when it is 0, then raising what ``flush`` raises)."""
        check_batch(keys, vectors, namespaces, self.dim)
        latest: dict[int, int] = {}  # faiss id -> row in this batch
        for row, key in enumerate(keys):
            latest[key_id(key)] = row
        if not latest:
            return
        rows = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
        batch = np.ascontiguousarray(vectors[rows])  # a copy: the queue must not see the caller's later writes
        fids = list(latest.keys())
        with self._lock:
            self._apply(fids, [keys[r] for r in latest.values()], [namespaces[r] for r in latest.values()],
                        batch, count_collisions=True)
            if self.path is None:
                return
            for i, (fid, row) in enumerate(latest.items()):
                self._tickets += 1
                self._queue[fid] = _Queued(keys[row], namespaces[row], batch[i], self._tickets)
            queued = len(self._queue)
        if self.flush_interval_s == 0:
            self.flush()
            return
        self._start_flusher()
        if queued >= self.flush_rows:
            self._wake.set()

    def _apply(self, fids: list[int], keys: list[bytes], namespaces: list[str], vectors: np.ndarray,
               *, count_collisions: bool) -> None:
        """Insert or replace distinct ids in the index and the key table; the caller holds the lock."""
        displaced = self._index.put(fids, keys, namespaces, vectors)
        if count_collisions:
            for fid, old, key in displaced:
                self.collisions += 1
                log.debug("faiss id %d: key %s displaced by %s", fid, old.hex(), key.hex())

    # -- persistence -----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """True while some put is not yet committed to the file."""
        with self._lock:
            return bool(self._queue)

    def flush(self) -> int:
        """Commit every queued put now, as one fsynced transaction; returns the rows committed.

        Raises ``ValueError`` without a path, ``OSError`` when the file cannot be reopened and
        ``sqlite3.Error`` when the commit fails (locked past ``busy_timeout_s``, disk full): the
        rows then stay queued, the store stays ``dirty``.
        """
        if self.path is None:
            raise ValueError("this FaissStore has no path to flush to")
        with self._flush_lock:
            with self._lock:
                if not self._queue:
                    return 0
                items = list(self._queue.items())
            if self._file is None:  # closed earlier and written to again: reopen
                opened = self._open_file()
                with self._lock:
                    self._file = opened
            lo, hi = self._file.append(
                np.fromiter((fid for fid, _ in items), dtype=np.int64, count=len(items)),
                [q.key for _, q in items], [q.namespace for _, q in items],
                np.stack([q.vector for _, q in items]),
            )
            with self._lock:
                if lo == self._seen_seq:
                    self._seen_seq = hi  # nothing of anyone else's between: no range to remember
                else:
                    self._own.append((lo, hi))
                for fid, q in items:
                    if self._queue.get(fid, q).ticket == q.ticket:
                        self._queue.pop(fid, None)
        return len(items)

    def save(self) -> None:
        """Commit queued puts now (what callers that used to write a snapshot call); see ``flush``."""
        self.flush()

    def _open_file(self) -> StoreFile:
        return StoreFile.open(self.path, self.dim, self.fingerprint, busy_timeout_s=self.busy_timeout_s)

    def _start_flusher(self) -> None:
        if self._flusher is not None and self._flusher.is_alive():
            return
        with self._thread_lock:
            if self._flusher is None or not self._flusher.is_alive():
                self._stopping = False
                self._wake.clear()
                self._flusher = threading.Thread(
                    target=_flush_loop, args=(weakref.ref(self), self._wake, self.flush_interval_s),
                    name=f"faiss-store-flush:{self.path.name}", daemon=True,
                )
                self._flusher.start()

    def _tick(self) -> None:
        """One round of the flusher: commit the queue, then load the other processes' rows."""
        try:
            self.flush()
        except Exception:
            self.flush_errors += 1
            log.exception("could not commit %d queued vectors to the local store %s; retrying in %.1f s",
                          len(self._queue), self.path, self.flush_interval_s)
        self.refresh()

    # -- sizes -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Vector bytes plus key-table bytes (16-byte key + 8-byte id per entry)."""
        with self._lock:
            return self._index.nbytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def held(self, namespace: str) -> tuple[int, int]:
        """(entries, bytes) of one namespace, counted as ``nbytes`` counts them."""
        with self._lock:
            n = self._index.count(namespace)
        return n, n * (self.dim * 4 + KEY_TABLE_BYTES)

    def close(self) -> None:
        """Stop the flusher, commit what is queued and close the file (raises what ``flush``
        raises; the rows then stay queued). The store stays usable in memory; a later put
        reopens the file."""
        with self._thread_lock:
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                self._stopping = True
                self._wake.set()
                flusher.join()
        if self.path is None:
            return
        try:
            self.flush()
        finally:
            with self._flush_lock, self._lock:
                if self._file is not None:
                    self._file.close()
                    self._file = None


def _flush_loop(ref: "weakref.ref[FaissStore]", wake: threading.Event, interval_s: float) -> None:
    """The flusher thread: a tick every ``interval_s`` (or when woken). It holds the store only
    during a tick, so a store dropped without ``close`` is collected and the thread ends."""
    while True:
        wake.wait(interval_s)
        wake.clear()
        store = ref()
        if store is None or store._stopping:
            return
        store._tick()
        del store
