"""Content hashing: which texts share an embedding.

Two requests share a cached vector only when the backbone (fingerprint), the namespace (a
tenant, or a LoRA adapter and its version), the truncation length and the normalised text all
agree. Every field is length-prefixed before hashing so no choice of field contents can make
two different tuples hash the same input (a plain separator could be smuggled inside a
namespace or a text).
"""

from __future__ import annotations

import unicodedata

import xxhash


def normalise_text(text: str) -> str:
    """NFC-normalise and collapse whitespace runs to one space, stripped at both ends.

    Visually identical inputs (composed vs. decomposed accents, stray spaces, newlines) then
    hit the same cache entry; the tokenizer would not tell them apart in any way a head sees.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def _field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return str(len(raw)).encode("ascii") + b":" + raw


def content_key(fingerprint: str, namespace: str, max_length: int, normalised_text: str) -> bytes:
    """16-byte xxh3_128 digest identifying one embedding.

    ``normalised_text`` should come from ``normalise_text``; the key does not normalise again
    so the caller pays for normalisation once and can reuse the text for tokenisation.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError("max_length must be an int")
    payload = b"".join(
        _field(v) for v in (fingerprint, namespace, str(max_length), normalised_text)
    )
    return xxhash.xxh3_128_digest(payload)


def key_id(key: bytes) -> int:
    """The faiss id of a content key (16 bytes): its first 8 bytes as a little-endian signed int64."""
    return int.from_bytes(key[:8], "little", signed=True)
