"""What every cache tier looks like to ``TieredCache``, and the ``CORRUPT`` answer.

A tier answers ``get_many`` with one entry per key: a vector, ``None`` (not held) or
``CORRUPT`` (something is stored under the key but it cannot be trusted: wrong header,
wrong length, another backbone's fingerprint). ``CORRUPT`` is kept apart from ``None`` so the
damage is counted rather than silently read as an ordinary miss.
"""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

import numpy as np



class _Corrupt:
    """Singleton type of ``CORRUPT``; compare with ``is``."""

    _instance: "_Corrupt | None" = None

    def __new__(cls) -> "_Corrupt":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CORRUPT"

    def __bool__(self) -> bool:
        # A corrupt entry must never pass an ``if vec:``-style "do we have it" check.
        return False

    def __reduce__(self) -> str:
        return "CORRUPT"


CORRUPT: Final = _Corrupt()

Entry = np.ndarray | None | _Corrupt


@runtime_checkable
class Tier(Protocol):
    """One storage level of the embedding cache.

    ``needs_namespace`` says whether ``put_many`` uses the namespaces it is given (the local
    FAISS store does, for namespace-restricted search); ``TieredCache`` does not promote into
    such a tier when the caller could not say which namespace a key belongs to.
    Vectors handed back may be read-only views; copy before mutating.
    """

    name: str
    needs_namespace: bool

    def get_many(self, keys: list[bytes]) -> list[Entry]: ...

    def put_many(self, keys: list[bytes], vectors: np.ndarray, namespaces: list[str]) -> None: ...

    def nbytes(self) -> int: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


def check_batch(keys: list[bytes], vectors: np.ndarray, namespaces: list[str], dim: int | None = None) -> None:
    """Reject a malformed write up front, so no tier silently stores a truncated or cast batch."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise ValueError("vectors must be a 2-D numpy array [n, dim]")
    if vectors.dtype != np.float32:
        raise ValueError(f"vectors must be float32, got {vectors.dtype}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"vectors have dim {vectors.shape[1]}, this tier holds dim {dim}")
    if not (len(keys) == vectors.shape[0] == len(namespaces)):
        raise ValueError(
            f"keys ({len(keys)}), vectors ({vectors.shape[0]}) and namespaces ({len(namespaces)}) differ in length"
        )
    for key in keys:
        if not isinstance(key, bytes) or len(key) != 16:
            raise ValueError("cache keys are 16-byte digests from content_key()")
