"""The local tier: a FAISS index of cached vectors that survives restarts.

Vectors live in ``IndexIDMap2(IndexFlatIP(dim))`` so they can be read back exactly by id
(``reconstruct``) and searched by similarity within one namespace. The faiss id is only 64
bits of the 128-bit content key, so the store keeps id -> (full key, namespace) beside the
index: a lookup whose full key differs from the stored one is a miss, never another text's
vector.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import faiss
import numpy as np

from .base import Entry, check_batch
from .faiss_file import Snapshot, read_snapshot, write_snapshot

log = logging.getLogger(__name__)


def key_id(key: bytes) -> int:
    """The faiss id of a content key: its first 8 bytes as a little-endian signed int64."""
    return int.from_bytes(key[:8], "little", signed=True)


class FaissStore:
    """Exact get/put by content key plus namespace-restricted inner-product search.

    ``dirty`` is true while puts have happened since the last ``save``; ``close`` saves only
    then. ``discarded_on_load`` counts a file at ``path`` that was ignored (another backbone,
    another width, or unreadable) — the store starts empty instead of failing startup.
    ``collisions`` counts puts that displaced a different key with the same 64-bit id.
    """

    name = "local"
    needs_namespace = True

    def __init__(self, dim: int, fingerprint: str, path: Path | None = None):
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.path = Path(path) if path is not None else None
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._entries: dict[int, tuple[bytes, str]] = {}
        self._by_namespace: dict[str, set[int]] = {}
        self._generation = 0
        self._saved_generation = 0
        self.discarded_on_load = 0
        self.collisions = 0
        if self.path is not None and self.path.exists():
            self._load(self.path)

    # -- reading ---------------------------------------------------------------------------

    def get_many(self, keys: list[bytes]) -> list[Entry]:
        out: list[Entry] = [None] * len(keys)
        with self._lock:
            positions: list[int] = []
            ids: list[int] = []
            for i, key in enumerate(keys):
                fid = key_id(key)
                held = self._entries.get(fid)
                if held is not None and held[0] == key:
                    positions.append(i)
                    ids.append(fid)
            if not ids:
                return out
            rows = self._index.reconstruct_batch(np.asarray(ids, dtype=np.int64))
        for pos, row in zip(positions, rows):
            out[pos] = row
        return out

    def search(self, query: np.ndarray, k: int, namespace: str) -> list[tuple[bytes, float]]:
        """Top-``k`` keys of ``namespace`` by inner product with ``query``, best first.

        The search runs with an id selector holding only that namespace's ids, and every
        result is checked against the key table again, so another namespace's key is never
        returned even if the selector were to let one through.
        """
        q = np.asarray(query)
        if q.dtype != np.float32 or q.shape != (self.dim,):
            raise ValueError(f"query must be float32 of shape ({self.dim},)")
        if k <= 0:
            return []
        with self._lock:
            ns_ids = self._by_namespace.get(namespace)
            if not ns_ids:
                return []
            sel = faiss.IDSelectorBatch(np.fromiter(ns_ids, dtype=np.int64, count=len(ns_ids)))
            k_eff = min(int(k), len(ns_ids))
            scores, found = self._index.search(
                q.reshape(1, -1), k_eff, params=faiss.SearchParameters(sel=sel)
            )
            out: list[tuple[bytes, float]] = []
            for fid, score in zip(found[0].tolist(), scores[0].tolist()):
                held = self._entries.get(fid)
                if fid == -1 or held is None or held[1] != namespace:
                    continue
                out.append((held[0], float(score)))
        return out

    # -- writing ---------------------------------------------------------------------------

    def put_many(self, keys: list[bytes], vectors: np.ndarray, namespaces: list[str]) -> None:
        """Insert or replace; within one batch the last occurrence of a key wins."""
        check_batch(keys, vectors, namespaces, self.dim)
        latest: dict[int, int] = {}  # faiss id -> row in this batch
        for row, key in enumerate(keys):
            latest[key_id(key)] = row
        if not latest:
            return
        ids = np.fromiter(latest.keys(), dtype=np.int64, count=len(latest))
        rows = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
        with self._lock:
            replaced = [fid for fid in latest if fid in self._entries]
            if replaced:
                self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(replaced, dtype=np.int64)))
            for fid, row in latest.items():
                old = self._entries.get(fid)
                if old is not None:
                    if old[0] != keys[row]:
                        self.collisions += 1
                        log.debug("faiss id %d: key %s displaced by %s", fid, old[0].hex(), keys[row].hex())
                    self._forget_namespace(fid, old[1])
                self._entries[fid] = (keys[row], namespaces[row])
                self._by_namespace.setdefault(namespaces[row], set()).add(fid)
            self._index.add_with_ids(np.ascontiguousarray(vectors[rows]), ids)
            self._generation += 1

    def _forget_namespace(self, fid: int, namespace: str) -> None:
        members = self._by_namespace.get(namespace)
        if members is not None:
            members.discard(fid)
            if not members:
                del self._by_namespace[namespace]

    # -- persistence -----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._generation != self._saved_generation

    def save(self) -> None:
        """Persist to ``path`` atomically (see ``faiss_file``); raises if there is no path.

        The snapshot is taken under the lock and written outside it, so lookups are not held
        up by disk I/O. Puts that land during the write keep the store dirty.
        """
        if self.path is None:
            raise ValueError("this FaissStore has no path to save to")
        with self._save_lock:
            with self._lock:
                generation = self._generation
                fids = list(self._entries)
                snap = Snapshot(
                    dim=self.dim,
                    fingerprint=self.fingerprint,
                    index_bytes=faiss.serialize_index(self._index),
                    ids=np.asarray(fids, dtype=np.int64),
                    keys=np.frombuffer(b"".join(self._entries[f][0] for f in fids), dtype=np.uint8).reshape(-1, 16),
                    namespaces=np.asarray([self._entries[f][1] for f in fids], dtype=str),
                )
            write_snapshot(self.path, snap)
            with self._lock:
                self._saved_generation = generation

    def _load(self, path: Path) -> None:
        try:
            snap = read_snapshot(path)
            if snap.dim != self.dim or snap.fingerprint != self.fingerprint:
                raise ValueError(
                    f"file holds dim={snap.dim} fingerprint={snap.fingerprint!r}, "
                    f"expected dim={self.dim} fingerprint={self.fingerprint!r}"
                )
            index = faiss.deserialize_index(snap.index_bytes)
            if not isinstance(index, faiss.IndexIDMap2) or index.d != self.dim:
                raise ValueError("serialised index is not an IndexIDMap2 of the right width")
            index_ids = faiss.vector_to_array(index.id_map)
            keys = [bytes(row) for row in snap.keys]
            if index.ntotal != len(keys) or set(index_ids.tolist()) != set(snap.ids.tolist()):
                raise ValueError("index ids and key table disagree")
            if any(key_id(k) != int(f) for k, f in zip(keys, snap.ids)):
                raise ValueError("ids do not match their keys")
        except Exception as exc:  # a bad file must never stop the service from starting
            self.discarded_on_load += 1
            log.warning("ignoring FAISS store %s: %s; starting empty", path, exc)
            return
        self._index = index
        for fid, key, ns in zip(snap.ids.tolist(), keys, snap.namespaces.tolist()):
            self._entries[fid] = (key, ns)
            self._by_namespace.setdefault(ns, set()).add(fid)

    # -- sizes -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Vector bytes plus key-table bytes (16-byte key + 8-byte id per entry)."""
        with self._lock:
            return int(self._index.ntotal) * (self.dim * 4 + 24)

    def __len__(self) -> int:
        with self._lock:
            return int(self._index.ntotal)

    def held(self, namespace: str) -> tuple[int, int]:
        """(entries, bytes) of one namespace, counted as ``nbytes`` counts them."""
        with self._lock:
            n = len(self._by_namespace.get(namespace, ()))
        return n, n * (self.dim * 4 + 24)

    def close(self) -> None:
        """Save if there is a path and unsaved puts; an ephemeral store just goes away."""
        if self.path is not None and self.dirty:
            self.save()
