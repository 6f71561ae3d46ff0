"""The in-memory half of the local tier: a FAISS index of vectors and the key table beside it.

Vectors live in ``IndexIDMap2(IndexFlatIP(dim))`` so they can be read back exactly by id
(``reconstruct``) and searched by similarity within one namespace. The faiss id is only 64
bits of the 128-bit content key (``keys.key_id``), so the table keeps id -> (full key,
namespace) beside the index: a lookup whose full key differs from the stored one is a miss,
never another text's vector, and a search result outside the asked namespace is dropped even
if the id selector were to let one through.

Not thread-safe on its own: ``FaissStore`` holds its lock around every call.
"""

from __future__ import annotations

from ._faiss import faiss
import numpy as np

from .base import Entry
from .keys import key_id

#: key-table bytes per entry, counted with the vector: a 16-byte key and an 8-byte id
KEY_TABLE_BYTES = 24


class KeyedIndex:
    """Exact get by content key, namespace-restricted inner-product search, insert-or-replace by id."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._entries: dict[int, tuple[bytes, str]] = {}  # faiss id -> (full key, namespace)
        self._by_namespace: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def nbytes(self) -> int:
        """Vector bytes plus key-table bytes of every entry."""
        return len(self) * (self.dim * 4 + KEY_TABLE_BYTES)

    def count(self, namespace: str) -> int:
        """Entries held for ``namespace``."""
        return len(self._by_namespace.get(namespace, ()))

    def fill(self, keys: list[bytes], positions, out: list[Entry]) -> None:
        """Set ``out[i]`` to the vector ([dim] float32) of ``keys[i]`` for each ``i`` in ``positions``
        whose full key is held; leave the others as they are."""
        found: list[int] = []
        ids: list[int] = []
        for i in positions:
            key = keys[i]
            fid = key_id(key)
            held = self._entries.get(fid)
            if held is not None and held[0] == key:
                found.append(i)
                ids.append(fid)
        if not ids:
            return
        rows = self._index.reconstruct_batch(np.asarray(ids, dtype=np.int64))
        for pos, row in zip(found, rows):
            out[pos] = row

    def search(self, query: np.ndarray, k: int, namespace: str) -> list[tuple[bytes, float]]:
        """Top-``k`` (key, inner product) of ``namespace`` for ``query`` ([1, dim] float32), best
        first; every result is checked against the key table again."""
        ns_ids = self._by_namespace.get(namespace)
        if not ns_ids:
            return []
        sel = faiss.IDSelectorBatch(np.fromiter(ns_ids, dtype=np.int64, count=len(ns_ids)))
        k_eff = min(int(k), len(ns_ids))
        scores, found = self._index.search(query, k_eff, params=faiss.SearchParameters(sel=sel))
        out: list[tuple[bytes, float]] = []
        for fid, score in zip(found[0].tolist(), scores[0].tolist()):
            held = self._entries.get(fid)
            if fid == -1 or held is None or held[1] != namespace:
                continue
            out.append((held[0], float(score)))
        return out

    def identical(self, fids: list[int], keys: list[bytes], namespaces: list[str],
                  vectors: np.ndarray) -> list[bool]:
        """Per row: whether exactly this key, namespace and vector ([n, dim] float32) is held under its id."""
        same = [i for i, fid in enumerate(fids) if self._entries.get(fid) == (keys[i], namespaces[i])]
        out = [False] * len(fids)
        if same:
            held = self._index.reconstruct_batch(np.asarray([fids[i] for i in same], dtype=np.int64))
            for i, eq in zip(same, np.all(held == vectors[same], axis=1).tolist()):
                out[i] = eq
        return out

    def put(self, fids: list[int], keys: list[bytes], namespaces: list[str],
            vectors: np.ndarray) -> list[tuple[int, bytes, bytes]]:
        """Insert or replace distinct ids with their keys, namespaces and vectors ([n, dim] float32);
        returns ``(id, old key, new key)`` for every entry displaced by a *different* key."""
        replaced = [fid for fid in fids if fid in self._entries]
        if replaced:
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(replaced, dtype=np.int64)))
        displaced = []
        for fid, key, ns in zip(fids, keys, namespaces):
            old = self._entries.get(fid)
            if old is not None:
                if old[0] != key:
                    displaced.append((fid, old[0], key))
                self._forget_namespace(fid, old[1])
            self._entries[fid] = (key, ns)
            self._by_namespace.setdefault(ns, set()).add(fid)
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                 np.asarray(fids, dtype=np.int64))
        return displaced

    def _forget_namespace(self, fid: int, namespace: str) -> None:
        members = self._by_namespace.get(namespace)
        if members is not None:
            members.discard(fid)
            if not members:
                del self._by_namespace[namespace]
