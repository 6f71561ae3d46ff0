"""A fixed-size uniform sample of a stream of rows: Vitter's Algorithm R, mergeable, serialisable.

Guarantee: after ``seen`` rows have been added, the reservoir holds ``min(seen, capacity)`` of
them, and every row ever added is held with probability ``min(1, capacity / seen)`` (a uniform
sample without replacement). How it is kept (Vitter 1985, "Random sampling with a reservoir",
ACM TOMS 11(1), Algorithm R), with rows numbered from 0:

    for row t in the stream:
        if t < capacity: slot[t] = row
        else:            j = uniform integer in [0, t];  if j < capacity: slot[j] = row

``add`` runs that loop vectorised over a batch (one ``rng.integers`` draw per row past the
first ``capacity``; where two rows of one batch pick the same slot the later one wins, as in
the loop). ``merge`` joins the samples of two disjoint streams (two replicas' windows) into a
uniform sample of their union: the number taken from the first is hypergeometric
(``capacity`` draws without replacement from an urn of ``seen_a`` + ``seen_b`` rows), and that
many rows are drawn uniformly from each side's sample. The result is again a uniform sample, so
Algorithm R can go on adding to it.

Storage is float32 (``capacity x dim`` values, or ``capacity`` scalars when ``dim`` is None).
Slot order is not a random order (slot t holds row t until it is replaced): subsample
``sample`` with an rng, never by slicing its head.
"""

from __future__ import annotations

import struct

import numpy as np

from headfleet.errors import ValidationError

_MAGIC = b"HFRS"
_FORMAT = 1
_HEADER = struct.Struct("<4sBBxxIIQ")  # magic, format, dtype code, pad, capacity, dim (0 = scalars), seen
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


class Reservoir:
    """A uniform sample of at most ``capacity`` rows of a stream (Vitter 1985, Algorithm R).

    ``dim``: the width of a row (an embedding, e.g. 384), or None for a stream of scalars
    (confidences). ``seen``: how many rows were ever added. ``len(reservoir)``: how many it holds,
    ``min(seen, capacity)``. Deterministic given the ``numpy.random.Generator`` passed to
    ``add`` and ``merge``.

    Raises ``ValidationError`` for a capacity < 1 or a dim < 1.
    """

    __slots__ = ("capacity", "dim", "seen", "_rows")

    def __init__(self, capacity: int, dim: int | None = None):
        if int(capacity) < 1:
            raise ValidationError(f"reservoir capacity must be >= 1, got {capacity}")
        if dim is not None and int(dim) < 1:
            raise ValidationError(f"reservoir dim must be >= 1 or None (scalars), got {dim}")
        self.capacity = int(capacity)
        self.dim = None if dim is None else int(dim)
        self.seen = 0
        shape = (self.capacity,) if self.dim is None else (self.capacity, self.dim)
        self._rows = np.empty(shape, dtype=np.float32)  # [capacity, dim] or [capacity]; rows past len() unset

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def __repr__(self) -> str:
        return f"Reservoir(capacity={self.capacity}, dim={self.dim}, seen={self.seen}, held={len(self)})"

    @property
    def sample(self) -> np.ndarray:
        """A copy of the rows held, float32 ``[len(self), dim]`` (``[len(self)]`` for scalars), in slot order."""
        return self._rows[: len(self)].copy()

    def add(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        """Offer a batch of rows to the sample (Algorithm R, see the module docstring).

        ``rows``: ``[b, dim]`` (``[b]`` for a scalar reservoir), any real dtype, stored as float32.
        Raises ``ValidationError`` for a wrong shape or a non-finite value (a NaN kept in the
        sample would poison every statistic computed from it).
        """
        x = np.asarray(rows, dtype=np.float32)
        want = 1 if self.dim is None else 2
        if x.ndim != want or (self.dim is not None and x.shape[1] != self.dim):
            shape = "[b]" if self.dim is None else f"[b, {self.dim}]"
            raise ValidationError(f"reservoir rows must have shape {shape}, got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise ValidationError("reservoir rows must be finite (NaN or inf offered)")
        b, t = len(x), self.seen
        fill = max(0, min(b, self.capacity - t))  # rows t .. capacity-1 go straight to their slot
        self._rows[t : t + fill] = x[:fill]
        rest = x[fill:]
        if len(rest):
            index = np.arange(t + fill, t + b, dtype=np.int64)  # the stream positions of `rest`
            j = rng.integers(0, index + 1)  # uniform in [0, t] per row
            hit = np.flatnonzero(j < self.capacity)
            if hit.size:
                # the loop's order: of the rows that pick one slot, the last one stays
                _, last_rev = np.unique(j[hit][::-1], return_index=True)
                keep = hit[hit.size - 1 - last_rev]
                self._rows[j[keep]] = rest[keep]
        self.seen = t + b

    def merge(self, other: Reservoir, rng: np.random.Generator) -> Reservoir:
        """A new reservoir sampling the union of both streams, weighted by their ``seen`` counts.

        Holds ``min(capacity, self.seen + other.seen)`` rows, of which the number from ``self`` is
        hypergeometric(``self.seen``, ``other.seen``, that size) — drawn as an urn without
        replacement, exact for any count (numpy's ``hypergeometric`` refuses counts >= 1e9) —
        and each side's share is drawn uniformly from its sample. Neither input is changed.
        Raises ``ValidationError`` when capacities or dims differ.
        """
        if other.capacity != self.capacity or other.dim != self.dim:
            raise ValidationError(
                f"cannot merge reservoirs of capacity/dim {self.capacity}/{self.dim} "
                f"and {other.capacity}/{other.dim}"
            )
        out = Reservoir(self.capacity, self.dim)
        out.seen = self.seen + other.seen
        k = len(out)
        u = rng.random(k)
        left_a, left_b, from_a = self.seen, other.seen, 0
        for i in range(k):  # k <= capacity draws: O(capacity), whatever the counts
            if u[i] * (left_a + left_b) < left_a:
                left_a, from_a = left_a - 1, from_a + 1
            else:
                left_b -= 1
        pick_a = rng.choice(len(self), size=from_a, replace=False)
        pick_b = rng.choice(len(other), size=k - from_a, replace=False)
        out._rows[:from_a] = self._rows[np.sort(pick_a)]
        out._rows[from_a:k] = other._rows[np.sort(pick_b)]
        return out

    def to_bytes(self, *, half: bool = False) -> bytes:
        """A compact serialisation: a 24-byte header then the held rows, little-endian.

        Header ``<4sBBxxIIQ``: ``b"HFRS"``, format 1, storage dtype (0 float32, 1 float16),
        capacity, dim (0 for scalars), seen. ``half=True`` stores float16 — half the bytes, about
        3 significant digits (relative error <= 2**-11, ample for drift statistics on unit-norm
        embeddings); raises ``ValidationError`` if a value exceeds float16's range (65504)
        rather than storing inf.
        """
        rows = self._rows[: len(self)]
        if half and rows.size and float(np.abs(rows).max()) > _FLOAT16_MAX:
            raise ValidationError("reservoir values exceed float16's range (65504); serialise with half=False")
        code = 1 if half else 0
        header = _HEADER.pack(_MAGIC, _FORMAT, code, self.capacity, self.dim or 0, self.seen)
        return header + rows.astype(_DTYPES[code], copy=False).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Reservoir:
        """The reservoir ``to_bytes`` wrote (rows back as float32).

        Raises ``ValidationError`` for a wrong magic, an unknown format or dtype, or a length that
        does not match the header (truncated or padded bytes).
        """
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise ValidationError(f"reservoir bytes too short for the header ({len(data)} < {_HEADER.size})")
        magic, fmt, code, capacity, dim, seen = _HEADER.unpack_from(data)
        if magic != _MAGIC or fmt != _FORMAT or code not in _DTYPES:
            raise ValidationError(f"not a reservoir (magic {magic!r}, format {fmt}, dtype code {code})")
        out = cls(capacity, dim or None)
        out.seen = seen
        n = len(out) * (dim or 1)
        want = _HEADER.size + n * _DTYPES[code].itemsize
        if len(data) != want:
            raise ValidationError(f"reservoir bytes have length {len(data)}, the header says {want}")
        values = np.frombuffer(data, dtype=_DTYPES[code], count=n, offset=_HEADER.size)
        out._rows[: len(out)] = values.reshape(out._rows[: len(out)].shape)
        return out
