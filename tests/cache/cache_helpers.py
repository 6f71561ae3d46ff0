"""Shared constants and builders for the cache tests (plain functions, imported by name)."""

from __future__ import annotations

import numpy as np

from headfleet.cache import content_key, normalise_text

DIM = 16
FP = "backbone-fp-1"
ENTRY = DIM * 4 + 16  # one memory-LRU entry: vector bytes + key bytes


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Unit-norm float32 rows [n, dim]; different seeds give different rows."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def keys_for(n: int, namespace: str = "tenant-a", tag: str = "text") -> list[bytes]:
    """Content keys of n distinct texts in one namespace."""
    return [content_key(FP, namespace, 256, normalise_text(f"{tag} {i}")) for i in range(n)]
