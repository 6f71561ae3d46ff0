"""In-process LRU of vectors, bounded by bytes rather than entries.

Bounding by bytes keeps the memory budget (``memory_cache_mb``) honest whatever the backbone
width is. One lock guards everything: the web workers and the write-back path share it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .base import Entry, check_batch


class MemoryLRU:
    """Least-recently-used map key -> float32 vector, holding at most ``max_bytes``.

    An entry costs its vector bytes plus its key bytes. Stored vectors are private read-only
    copies, so a caller mutating its batch afterwards cannot change what the cache serves.
    """

    name = "memory"
    needs_namespace = False

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._namespace: dict[bytes, str] = {}
        self._ns_bytes: dict[str, list[int]] = {}  # namespace -> [entries, bytes]
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.rejected = 0  # entries larger than max_bytes on their own: never stored

    @staticmethod
    def _cost(key: bytes, vector: np.ndarray) -> int:
        return vector.nbytes + len(key)

    def get_many(self, keys: list[bytes]) -> list[Entry]:
        out: list[Entry] = []
        with self._lock:
            for key in keys:
                vec = self._entries.get(key)
                if vec is not None:
                    self._entries.move_to_end(key)
                out.append(vec)
        return out

    def put_many(self, keys: list[bytes], vectors: np.ndarray, namespaces: list[str]) -> None:
        check_batch(keys, vectors, namespaces)
        with self._lock:
            for key, row, ns in zip(keys, vectors, namespaces):
                vec = row.copy()
                vec.flags.writeable = False
                cost = self._cost(key, vec)
                old = self._entries.pop(key, None)
                if old is not None:
                    self._forget(key, old)
                if cost > self.max_bytes:
                    self.rejected += 1
                    continue
                self._entries[key] = vec
                self._bytes += cost
                self._namespace[key] = ns
                held = self._ns_bytes.setdefault(ns, [0, 0])
                held[0] += 1
                held[1] += cost
                while self._bytes > self.max_bytes:
                    old_key, old_vec = self._entries.popitem(last=False)
                    self._forget(old_key, old_vec)
                    self.evictions += 1

    def _forget(self, key: bytes, vec: np.ndarray) -> None:
        cost = self._cost(key, vec)
        self._bytes -= cost
        ns = self._namespace.pop(key, "")
        held = self._ns_bytes.get(ns)
        if held is not None:
            held[0] -= 1
            held[1] -= cost
            if held[0] <= 0:
                del self._ns_bytes[ns]

    def held(self, namespace: str) -> tuple[int, int]:
        """(entries, bytes) stored under ``namespace``, counted as ``nbytes`` counts them."""
        with self._lock:
            entries, nbytes = self._ns_bytes.get(namespace, (0, 0))
        return entries, nbytes

    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        """Membership without touching recency (for inspection and tests)."""
        with self._lock:
            return key in self._entries

    def close(self) -> None:
        """Nothing to persist: the memory tier is rebuilt from the lower tiers."""
