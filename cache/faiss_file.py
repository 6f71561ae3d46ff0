"""The local FAISS store's on-disk format: one ``.npz`` file, replaced atomically.

One file (not an index file beside a key file) means a crash can never leave an index from
one save next to the keys of another. The file is written to a temporary name in the same
folder, fsynced and renamed over the old one, so a reader sees either the previous complete
file or the new complete file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


@dataclasses.dataclass
class Snapshot:
    """Everything a ``FaissStore`` needs to come back: the serialised index and its key table."""

    dim: int
    fingerprint: str
    index_bytes: np.ndarray  # [nbytes] uint8, from faiss.serialize_index
    ids: np.ndarray  # [n] int64, the faiss ids
    keys: np.ndarray  # [n, 16] uint8, the full content keys
    namespaces: np.ndarray  # [n] unicode


def write_snapshot(path: Path, snap: Snapshot) -> None:
    """Write ``snap`` to ``path`` atomically; on any failure the temp file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"format": FORMAT_VERSION, "dim": snap.dim, "fingerprint": snap.fingerprint})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # A file object (not a name) stops numpy from appending ".npz" to the temp name.
            np.savez(
                f,
                meta=np.array(meta),
                index=snap.index_bytes,
                ids=snap.ids,
                keys=snap.keys,
                namespaces=snap.namespaces,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort where directories cannot be opened."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def read_snapshot(path: Path) -> Snapshot:
    """Read and shape-check a snapshot; raises ``ValueError`` (or numpy's errors) when unusable."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT_VERSION:
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
