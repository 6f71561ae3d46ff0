"""Byte layout of one vector in Redis: a 17-byte header, then raw little-endian float32.

Redis is shared by every replica and outlives deployments, so a value must say what it is:
the magic and version catch foreign or truncated data, dim and dtype catch a width change,
and 8 bytes of the backbone fingerprint's hash catch a value written by a replica running a
different backbone under a colliding key. Anything that does not decode is ``CORRUPT``.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from .base import CORRUPT, Entry

MAGIC = b"HFV1"
DTYPE_FLOAT32 = 0
_HEADER = struct.Struct("<4sIB8s")  # magic, dim, dtype code, fingerprint hash
HEADER_BYTES = _HEADER.size


def fingerprint_tag(fingerprint: str) -> bytes:
    """8 bytes identifying the backbone that produced a vector."""
    return xxhash.xxh3_64_digest(fingerprint.encode("utf-8"))


def encode(vector: np.ndarray, tag: bytes) -> bytes:
    """Header + float32 bytes of one row ([dim] float32)."""
    body = np.ascontiguousarray(vector, dtype="<f4")
    return _HEADER.pack(MAGIC, body.shape[0], DTYPE_FLOAT32, tag) + body.tobytes()


def decode(value: bytes | None, dim: int, tag: bytes) -> Entry:
    """The vector in ``value``, ``None`` when absent, ``CORRUPT`` when it cannot be trusted."""
    if value is None:
        return None
    if len(value) != HEADER_BYTES + 4 * dim:
        return CORRUPT
    magic, got_dim, dtype, got_tag = _HEADER.unpack_from(value)
    if magic != MAGIC or got_dim != dim or dtype != DTYPE_FLOAT32 or got_tag != tag:
        return CORRUPT
    return np.frombuffer(value, dtype="<f4", offset=HEADER_BYTES).astype(np.float32, copy=False)
