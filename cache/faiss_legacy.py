"""Format 1 of the local FAISS store: the single ``.npz`` snapshot that the SQLite store replaces.

Only read, never written: ``faiss_file.StoreFile.open`` migrates a snapshot it finds at the
store's path into the database, then removes it. A snapshot holds the serialised
``IndexIDMap2(IndexFlatIP(dim))``, the faiss ids, the full 16-byte content keys and the
namespaces, plus ``meta`` (format, width, backbone fingerprint). Every field is shape-checked
and the index is checked against the key table before a row is handed out; anything that does
not fit raises ``ValueError``, and the caller moves the file aside.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ._faiss import faiss
import numpy as np

from .keys import key_id

LEGACY_FORMAT_VERSION = 1


@dataclasses.dataclass
class Snapshot:
    """A format-1 file: an ``.npz`` with the serialised index and its key table."""

    dim: int
    fingerprint: str
    index_bytes: np.ndarray  # [nbytes] uint8, from faiss.serialize_index of an IndexIDMap2
    ids: np.ndarray  # [n] int64, the faiss ids
    keys: np.ndarray  # [n, 16] uint8, the full content keys
    namespaces: np.ndarray  # [n] unicode


def read_snapshot(path: Path) -> Snapshot:
    """Read and shape-check a format-1 snapshot; raises ``ValueError`` (or numpy's errors) when unusable."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != LEGACY_FORMAT_VERSION:
            raise ValueError(f"unknown store format {meta.get('format')!r}")
        snap = Snapshot(
            dim=int(meta["dim"]),
            fingerprint=str(meta["fingerprint"]),
            index_bytes=z["index"],
            ids=z["ids"],
            keys=z["keys"],
            namespaces=z["namespaces"],
        )
    n = snap.ids.shape[0]
    if snap.ids.dtype != np.int64 or snap.ids.ndim != 1:
        raise ValueError("ids must be a 1-D int64 array")
    if snap.keys.dtype != np.uint8 or snap.keys.shape != (n, 16):
        raise ValueError("keys must be [n, 16] uint8")
    if snap.namespaces.shape != (n,) or (n and snap.namespaces.dtype.kind != "U"):
        raise ValueError("namespaces must be [n] strings")
    if snap.index_bytes.dtype != np.uint8 or snap.index_bytes.ndim != 1:
        raise ValueError("index must be serialised bytes")
    return snap


def legacy_rows(snap: Snapshot, dim: int, fingerprint: str) -> tuple[np.ndarray, list[bytes], list[str], np.ndarray]:
    """The rows of a format-1 snapshot: ``(ids [n] int64, keys, namespaces, vectors [n, dim] float32)``.

    Raises ``ValueError`` when it holds another width or backbone, or its index and key table
    disagree.
    """
    if snap.dim != dim or snap.fingerprint != fingerprint:
        raise ValueError(f"file holds dim={snap.dim} fingerprint={snap.fingerprint!r}, "
                         f"expected dim={dim} fingerprint={fingerprint!r}")
    index = faiss.deserialize_index(snap.index_bytes)
    if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
        raise ValueError("serialised index is not an IndexIDMap2 of the right width")
    keys = [bytes(row) for row in snap.keys]
    index_ids = faiss.vector_to_array(index.id_map)
    if index.ntotal != len(keys) or set(index_ids.tolist()) != set(snap.ids.tolist()):
        raise ValueError("index ids and key table disagree")
    if any(key_id(k) != int(f) for k, f in zip(keys, snap.ids)):
        raise ValueError("ids do not match their keys")
    ids = snap.ids.astype(np.int64)
    vectors = index.reconstruct_batch(ids) if len(ids) else np.empty((0, dim), dtype=np.float32)
    return ids, keys, [str(ns) for ns in snap.namespaces.tolist()], np.asarray(vectors, dtype=np.float32)
