"""A trained head as a handful of plain float32 arrays.

Why plain arrays rather than a pickled sklearn estimator: a head is a few kilobytes of weights
that thousands of tenants each own; arrays can be stacked by the fleet into one batched matmul,
stored with safetensors (no pickle, so loading a tenant's file cannot run code), and read back
by any backend. sklearn is only used to *fit*; ``from_sklearn`` converts the fitted estimator.

Math (x: [d], one row):
    logreg: z = W1 @ x + b1                       # [L]
    mlp:    z = W2 @ relu(W1 @ x + b1) + b2       # [L]
    p = sigmoid(z) if multi_label else softmax(z)
A binary single-label head is stored as two softmax rows with logits [0, z], which is exactly
sklearn's [1 - sigmoid(z), sigmoid(z)], so the fleet never needs a third output kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headfleet.errors import ValidationError
from headfleet.heads.activations import sigmoid, softmax

WEIGHTS_FILE = "weights.safetensors"
FORMAT = "headfleet.head/1"
KINDS = ("logreg", "mlp")


@dataclass(eq=False)
class HeadArrays:
    """One head's weights and label schema; arrays are float32 and C-contiguous after init."""

    kind: str  # "logreg" | "mlp"
    labels: list[str]
    multi_label: bool  # True: independent sigmoid per label; False: softmax over labels
    W1: np.ndarray  # logreg: [L, d]; mlp: hidden layer [h, d]
    b1: np.ndarray  # logreg: [L]; mlp: [h]
    W2: np.ndarray | None = None  # mlp output layer [L, h]
    b2: np.ndarray | None = None  # mlp [L]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValidationError(f"unknown head kind {self.kind!r}; expected one of {KINDS}")
        self.labels = [str(label) for label in self.labels]
        if len(set(self.labels)) != len(self.labels):
            raise ValidationError(f"head labels must be unique, got {self.labels}")
        self.multi_label = bool(self.multi_label)
        self.W1 = _f32(self.W1, "W1", ndim=2)
        self.b1 = _f32(self.b1, "b1", ndim=1)
        if self.kind == "mlp":
            if self.W2 is None or self.b2 is None:
                raise ValidationError("an mlp head needs W2 and b2")
            self.W2 = _f32(self.W2, "W2", ndim=2)
            self.b2 = _f32(self.b2, "b2", ndim=1)
            h = self.W1.shape[0]
            if self.b1.shape != (h,) or self.W2.shape[1] != h:
                raise ValidationError(
                    f"mlp shapes disagree: W1 {self.W1.shape}, b1 {self.b1.shape}, W2 {self.W2.shape}"
                )
            out_w, out_b = self.W2, self.b2
        else:
            if self.W2 is not None or self.b2 is not None:
                raise ValidationError("a logreg head has no W2/b2")
            out_w, out_b = self.W1, self.b1
        n = len(self.labels)
        if out_w.shape[0] != n or out_b.shape != (n,):
            raise ValidationError(
                f"{n} labels but output layer has shape {out_w.shape} and bias {out_b.shape}"
            )
        if n < 1:
            raise ValidationError("a head needs at least one label")

    # --- shape ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Input embedding width d."""
        return int(self.W1.shape[1])

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @property
    def hidden(self) -> int:
        """Hidden width of an mlp head; 0 for logreg."""
        return int(self.W1.shape[0]) if self.kind == "mlp" else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the weight arrays (what a head costs in memory, excluding labels)."""
        return sum(a.nbytes for a in self._arrays().values())

    # --- inference (the single-head reference the fleet is tested against) ----------------
    def logits(self, X: np.ndarray) -> np.ndarray:
        """Raw output-layer values [n, L], computed in float64 (this is the reference path)."""
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValidationError(f"expected embeddings of shape [n, {self.dim}], got {x.shape}")
        z = x @ self.W1.T.astype(np.float64) + self.b1
        if self.kind == "mlp":
            z = np.maximum(z, 0.0) @ self.W2.T.astype(np.float64) + self.b2
        return z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probabilities [n, L] as float32, matching the sklearn estimator it came from."""
        z = self.logits(X)
        p = sigmoid(z) if self.multi_label else softmax(z)
        return p.astype(np.float32)

    # --- persistence -------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write ``folder/weights.safetensors`` (:meth:`to_bytes`); labels/kind ride in the safetensors
        metadata so the file alone is a complete head (the registry manifest repeats them for humans)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / WEIGHTS_FILE).write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        """The ``weights.safetensors`` file, byte for byte the same for equal heads, so the sha256 the
        registry records names the weights (safetensors' own writer orders the metadata by a random
        per-call hash seed). Layout as safetensors writes it: u64 little-endian header length, the JSON
        header (``__metadata__`` with sorted keys, then each array in name order with dtype F32, shape
        and data offsets) padded with spaces to a multiple of 8, then the little-endian float32 data."""
        header: dict[str, Any] = {"__metadata__": {
            "format": FORMAT, "kind": self.kind, "labels": json.dumps(self.labels, ensure_ascii=False),
            "multi_label": json.dumps(self.multi_label)}}
        blobs, offset = [], 0
        for name, arr in sorted(self._arrays().items()):
            data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + b"".join(blobs)

    @classmethod
    def load(cls, folder: Path) -> "HeadArrays":
        """Read a head written by ``save``; raises ValidationError for a foreign or unreadable file."""
        path = Path(folder) / WEIGHTS_FILE
        return cls.from_bytes(path.read_bytes(), where=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "head") -> "HeadArrays":
        """A head from the bytes of a ``weights.safetensors`` file (so a caller can hash exactly the
        bytes it parses). Raises ValidationError naming ``where`` for a truncated, foreign or
        otherwise unreadable file."""
        from safetensors.numpy import load

        try:
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8: 8 + n]).get("__metadata__") or {}
            arrays = load(data)
            if meta.get("format") != FORMAT:
                raise ValidationError(f"{where} is not a headfleet head (format {meta.get('format')!r})")
            return cls(kind=meta["kind"], labels=json.loads(meta["labels"]),
                       multi_label=json.loads(meta["multi_label"]), W1=arrays["W1"], b1=arrays["b1"],
                       W2=arrays.get("W2"), b2=arrays.get("b2"))
        except ValidationError:
            raise
        except Exception as exc:  # SafetensorError, bad JSON, missing keys, wrong shapes
            raise ValidationError(f"{where} cannot be read as a head: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_sklearn(
        cls, model: Any, labels: list[str] | None = None, multi_label: bool | None = None
    ) -> "HeadArrays":
        """Convert a fitted LogisticRegression, OneVsRestClassifier(LogisticRegression) or
        MLPClassifier; see ``headfleet.heads.convert`` for what each maps to."""
        from headfleet.heads.convert import head_from_sklearn

        return head_from_sklearn(model, labels=labels, multi_label=multi_label)

    # --- helpers -----------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"W1": self.W1, "b1": self.b1}
        if self.kind == "mlp":
            arrays.update(W2=self.W2, b2=self.b2)
        return arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadArrays):
            return NotImplemented
        if (self.kind, self.labels, self.multi_label) != (other.kind, other.labels, other.multi_label):
            return False
        mine, theirs = self._arrays(), other._arrays()
        return mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and np.array_equal(mine[k], theirs[k]) for k in mine
        )

    __hash__ = None  # mutable arrays: equal heads need not hash alike

    def __repr__(self) -> str:
        shape = f"d={self.dim}, L={self.n_labels}" + (f", h={self.hidden}" if self.kind == "mlp" else "")
        return f"HeadArrays({self.kind}, {shape}, multi_label={self.multi_label}, labels={self.labels})"


def _f32(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    if arr.ndim != ndim:
        raise ValidationError(f"{name} must be {ndim}-d, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValidationError(f"{name} holds non-finite values")
    return arr
