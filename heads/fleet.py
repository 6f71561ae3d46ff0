"""Every loaded head stacked into padded arrays, so any subset is scored in one batched op.

Layout (rebuilt lazily, at the first predict after an add/remove — never per predict):
    linear group: W [G, Lmax, d], b [G, Lmax]                      (logreg heads)
    mlp group:    W1 [G, Hmax, d], b1 [G, Hmax], W2 [G, Lmax, Hmax], b2 [G, Lmax]
    binary group: two-label softmax heads as one column w1 - w0, p1 = sigmoid(z1 - z0)
Padding is zeros: a padded hidden unit is relu(0) = 0 and meets a zero column of W2, so it adds
nothing; padded labels get logit -inf before softmax (probability exactly 0) and are zeroed
after sigmoid.

predict(X [n, d], keys) per group, with r = the group rows of the requested keys:
    linear: z[n, k, L] = (X @ W[r].reshape(k*L, d).T).reshape(n, k, L) + b[r]
    mlp:    a[n, k, H] = relu((X @ W1[r].reshape(k*H, d).T).reshape(n, k, H) + b1[r])
            z[k, n, L] = a.transpose(1, 0, 2) @ W2[r].transpose(0, 2, 1) + b2[r]
    p = sigmoid(z) where the head is multi-label else softmax(masked z), scattered back into
    request order. One GEMM per group, whatever the number of heads asked for.

Concurrency: add/remove take a lock and drop the snapshot; predict works on whichever
immutable snapshot it picked up, so a predict racing an add sees the fleet before or after it,
never half of it.

Not on the GPU: this is the only serving path for heads, on every device, and it is numpy on the
host. The batched-heads Triton kernel (``headfleet.kernels.batched_heads``, logits + activation
fused per (row, head) pair) is tested against its reference and benched (``bench/gpu_kernels.py``)
but nothing here calls it: it covers linear heads only (no MLP group), and the embeddings reach
the fleet as host arrays from the cache tiers, so wiring it in needs the vectors kept on the
device first. Until then heads are scored by numpy on a GPU deployment too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from headfleet.errors import NotFoundError, ValidationError
from headfleet.heads.activations import sigmoid, softmax
from headfleet.heads.types import HeadArrays

_LINEAR, _MLP, _BINARY = 0, 1, 2


@dataclass
class FleetOutput:
    """Probabilities for n rows x k requested heads, padded to the widest requested head."""

    probs: np.ndarray  # [n, k, Lmax] float32; entries past a head's n_labels are 0
    n_labels: np.ndarray  # [k] int
    labels: list[list[str]]  # [k][n_labels[j]]
    multi_label: np.ndarray  # [k] bool
    keys: list[str] = field(default_factory=list)  # [k], the request order

    def for_head(self, j: int) -> np.ndarray:
        """Probabilities of the j-th requested head, [n, L_j] (a view, no padding)."""
        return self.probs[:, j, : int(self.n_labels[j])]

    def top_labels(self) -> list[list[str | list[str]]]:
        """Per row, per head: the argmax label (single-label) or the labels with p >= 0.5
        (multi-label, possibly none)."""
        n, k = self.probs.shape[:2]
        best = self.probs.argmax(axis=2) if k else np.zeros((n, 0), dtype=int)  # padding is 0, never the max
        on = self.probs >= 0.5
        out: list[list[str | list[str]]] = []
        for i in range(n):
            row: list[str | list[str]] = []
            for j in range(k):
                names = self.labels[j]
                if self.multi_label[j]:
                    row.append([names[c] for c in np.flatnonzero(on[i, j, : len(names)])])
                else:
                    row.append(names[int(best[i, j])])
            out.append(row)
        return out


@dataclass(frozen=True)
class _Group:
    """One kind of head, stacked and pre-transposed so a request is one matmul per layer.

    The first layer is kept as ``W1t`` [d, G*W] (W = Lmax for linear heads, Hmax for MLPs) so a
    request for most of the group multiplies against it in place, without gathering a copy.
    Padded output slots carry a bias of -inf: softmax and sigmoid both turn them into exactly 0.
    """

    W1t: np.ndarray  # [d, G*W]
    b1: np.ndarray  # [G, W]; linear: padded slots -inf
    W2t: np.ndarray | None  # mlp: [G, Hmax, Lmax] (second layer, transposed)
    b2: np.ndarray | None  # mlp: [G, Lmax], padded slots -inf
    n_labels: np.ndarray  # [G]
    multi_label: np.ndarray  # [G] bool
    binary: bool = False  # two-label softmax heads stored as one logit difference

    @property
    def size(self) -> int:
        return len(self.n_labels)

    def _first_layer(self, X: np.ndarray, part: "_Part") -> np.ndarray:
        """X @ W1[rows].T + b1[rows] as [n, k, W]."""
        G, W = self.b1.shape
        n, k = X.shape[0], len(part.rows)
        if not part.gather:  # most of the group: one matmul against all of it, then pick the rows
            z = (X @ self.W1t).reshape(n, G, W)
            z = z if part.whole else z[:, part.rows]
        else:
            cols = (part.rows[:, None] * W + np.arange(W)[None, :]).ravel()
            z = (X @ self.W1t[:, cols]).reshape(n, k, W)
        return z + self.b1[part.rows]

    def probs(self, X: np.ndarray, part: "_Part") -> np.ndarray:
        """[n, k, Lmax] probabilities for the group rows of ``part``; padded slots are 0."""
        z = self._first_layer(X, part)
        if self.binary:  # softmax([z0, z1]) = [1 - sigmoid(z1 - z0), sigmoid(z1 - z0)]
            p1 = sigmoid(z)
            return np.concatenate([1.0 - p1, p1], axis=-1)
        if self.W2t is not None:
            np.maximum(z, 0.0, out=z)  # relu; padded hidden units have zero weights and bias
            z = np.matmul(z.transpose(1, 0, 2), self.W2t[part.rows]).transpose(1, 0, 2) + self.b2[part.rows]
        if part.single is None:  # no multi-label head among the rows
            return softmax(z)
        out = sigmoid(z)
        if part.single.size:
            out[:, part.single] = softmax(z[:, part.single])
        return out

    def part(self, pos: np.ndarray, rows: np.ndarray) -> "_Part":
        """What :meth:`probs` needs for group rows ``rows`` (request positions ``pos``), worked
        out once per set of classifiers asked for (:class:`HeadFleet` keeps it with the snapshot)."""
        G, k = self.b1.shape[0], len(rows)
        whole = k == G and bool(np.array_equal(rows, np.arange(G)))
        multi = self.multi_label[rows]
        single = None if not multi.any() else np.flatnonzero(~multi)
        return _Part(pos, rows, 2 * k < G, whole, multi, single)


@dataclass(frozen=True)
class _Part:
    """One group's share of a request's classifiers, worked out once (``_Group.part``): indices
    only, never weights, so a remembered plan costs a few bytes per head whatever the heads' sizes."""

    pos: np.ndarray  # [k_g] positions in the request
    rows: np.ndarray  # [k_g] rows in the group
    gather: bool  # a few of the group: gather their first-layer columns; else multiply the whole group
    whole: bool  # rows are exactly 0..G-1: no pick after the matmul
    multi: np.ndarray  # [k_g] bool
    single: np.ndarray | None  # None: no multi-label row; else the single-label rows' indices


@dataclass(frozen=True)
class _Plan:
    """A request's classifiers (as a key tuple) against one snapshot: everything predict needs
    besides the matmuls, so a repeated set of classifiers costs one dict lookup."""

    parts: tuple[tuple[_Group, _Part], ...]
    labels: tuple[list[str], ...]
    n_labels: np.ndarray  # [k]
    multi: np.ndarray  # [k] bool
    width: int  # the widest requested head's labels


_PLANS_PER_SNAPSHOT = 4096  # distinct classifier sets remembered; past it the cache starts over


@dataclass(frozen=True)
class _Snapshot:
    where: dict[str, tuple[int, int]]  # key -> (group, row)
    groups: tuple[_Group | None, _Group | None, _Group | None]  # (linear, mlp, binary linear)
    labels: dict[str, list[str]]
    plans: dict[tuple[str, ...], _Plan] = field(default_factory=dict)

    def plan(self, keys: tuple[str, ...]) -> _Plan:
        """The :class:`_Plan` of ``keys``, made at its first use; NotFoundError for a key not loaded."""
        plan = self.plans.get(keys)
        if plan is not None:
            return plan
        missing = [k for k in keys if k not in self.where]
        if missing:
            raise NotFoundError(f"head(s) not loaded: {sorted(set(missing))}")
        labels = tuple(self.labels[key] for key in keys)
        n_labels = np.array([len(x) for x in labels], dtype=np.int64)
        multi = np.zeros(len(keys), dtype=bool)
        parts = []
        if keys:
            loc = np.array([self.where[key] for key in keys], dtype=np.int64)  # [k, 2]: group, row
            for g, group in enumerate(self.groups):
                pos = np.flatnonzero(loc[:, 0] == g)
                if group is None or pos.size == 0:
                    continue
                part = group.part(pos, loc[pos, 1])
                multi[pos] = part.multi
                parts.append((group, part))
        plan = _Plan(tuple(parts), labels, n_labels, multi, int(n_labels.max()) if keys else 0)
        if len(self.plans) >= _PLANS_PER_SNAPSHOT:
            self.plans.clear()
        self.plans[keys] = plan
        return plan


class HeadFleet:
    """A keyed set of heads sharing one embedding width, scored together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heads: dict[str, HeadArrays] = {}
        self._dim: int | None = None
        self._snapshot: _Snapshot | None = None

    # --- membership ---------------------------------------------------------------------------
    def add(self, key: str, head: HeadArrays) -> None:
        """Add a head, or replace the one under ``key`` (a new version of the same classifier)."""
        with self._lock:
            others = [h for k, h in self._heads.items() if k != key]
            if others and head.dim != others[0].dim:
                raise ValidationError(f"head {key!r} takes {head.dim}-d embeddings; this fleet holds {others[0].dim}-d heads")
            self._heads = {**self._heads, key: head}
            self._snapshot = None

    def remove(self, key: str) -> None:
        with self._lock:
            if key not in self._heads:
                raise NotFoundError(f"head {key!r} is not loaded")
            self._heads = {k: h for k, h in self._heads.items() if k != key}
            self._snapshot = None

    def __contains__(self, key: object) -> bool:
        return key in self._heads

    def __len__(self) -> int:
        return len(self._heads)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._heads))

    def keys(self) -> list[str]:
        return list(self._heads)

    def get(self, key: str) -> HeadArrays:
        try:
            return self._heads[key]
        except KeyError:
            raise NotFoundError(f"head {key!r} is not loaded") from None

    @property
    def dim(self) -> int | None:
        heads = self._heads
        return next(iter(heads.values())).dim if heads else None

    @property
    def nbytes(self) -> int:
        """Bytes of the heads' own arrays (the stacked copy costs about as much again, plus padding)."""
        return sum(h.nbytes for h in self._heads.values())

    # --- scoring ------------------------------------------------------------------------------
    def predict(self, X: np.ndarray, keys: Sequence[str]) -> FleetOutput:
        """Score X [n, d] with the heads ``keys`` (any subset, any order, repeats allowed).

        Returns probabilities [n, k, Lmax] float32; NotFoundError for a key not loaded,
        ValidationError for X not [n, d] with the heads' d."""
        keys = tuple(keys)
        plan = self._current().plan(keys)
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValidationError(f"expected embeddings [n, d], got shape {X.shape}")
        n, k = X.shape[0], len(keys)
        probs = np.zeros((n, k, plan.width), dtype=np.float32)
        for group, part in plan.parts:
            if X.shape[1] != group.W1t.shape[0]:
                raise ValidationError(f"expected embeddings [n, {group.W1t.shape[0]}], got shape {X.shape}")
            p = group.probs(X, part)[:, :, : plan.width]  # beyond the widest requested head: zeros
            probs[:, part.pos, : p.shape[2]] = p
        return FleetOutput(probs, plan.n_labels.copy(), list(plan.labels), plan.multi.copy(), list(keys))

    # --- stacking -----------------------------------------------------------------------------
    def _current(self) -> _Snapshot:
        snap = self._snapshot
        if snap is None:
            with self._lock:
                if self._snapshot is None:
                    self._snapshot = _build(self._heads)
                snap = self._snapshot
        return snap


def _build(heads: dict[str, HeadArrays]) -> _Snapshot:
    where: dict[str, tuple[int, int]] = {}
    members: tuple[list[HeadArrays], ...] = ([], [], [])
    for key, head in heads.items():
        if head.kind == "mlp":
            g = _MLP
        else:
            g = _BINARY if head.n_labels == 2 and not head.multi_label else _LINEAR
        where[key] = (g, len(members[g]))
        members[g].append(head)
    groups = (_stack_linear(members[_LINEAR]), _stack_mlp(members[_MLP]), _stack_binary(members[_BINARY]))
    return _Snapshot(where=where, groups=groups, labels={k: h.labels for k, h in heads.items()})


def _stack_linear(heads: list[HeadArrays]) -> _Group | None:
    if not heads:
        return None
    G, d, L = len(heads), heads[0].dim, max(h.n_labels for h in heads)
    W = np.zeros((G, L, d), dtype=np.float32)
    b = np.full((G, L), -np.inf, dtype=np.float32)
    for i, h in enumerate(heads):
        W[i, : h.n_labels] = h.W1
        b[i, : h.n_labels] = h.b1
    W1t = np.ascontiguousarray(W.reshape(G * L, d).T)
    return _Group(W1t, b, None, None, _n_labels(heads), _multi(heads))


def _stack_binary(heads: list[HeadArrays]) -> _Group | None:
    """Two-label softmax heads need one column each, (w1 - w0), instead of two: half the GEMM."""
    if not heads:
        return None
    W1t = np.ascontiguousarray(np.stack([h.W1[1] - h.W1[0] for h in heads], axis=1))  # [d, G]
    b = np.array([[h.b1[1] - h.b1[0]] for h in heads], dtype=np.float32)  # [G, 1]
    return _Group(W1t, b, None, None, _n_labels(heads), _multi(heads), binary=True)


def _stack_mlp(heads: list[HeadArrays]) -> _Group | None:
    if not heads:
        return None
    G, d = len(heads), heads[0].dim
    L, H = max(h.n_labels for h in heads), max(h.hidden for h in heads)
    W1 = np.zeros((G, H, d), dtype=np.float32)
    b1 = np.zeros((G, H), dtype=np.float32)
    W2t = np.zeros((G, H, L), dtype=np.float32)
    b2 = np.full((G, L), -np.inf, dtype=np.float32)
    for i, h in enumerate(heads):
        W1[i, : h.hidden] = h.W1
        b1[i, : h.hidden] = h.b1
        W2t[i, : h.hidden, : h.n_labels] = h.W2.T
        b2[i, : h.n_labels] = h.b2
    W1t = np.ascontiguousarray(W1.reshape(G * H, d).T)
    return _Group(W1t, b1, W2t, b2, _n_labels(heads), _multi(heads))


def _n_labels(heads: list[HeadArrays]) -> np.ndarray:
    return np.array([h.n_labels for h in heads], dtype=np.int64)


def _multi(heads: list[HeadArrays]) -> np.ndarray:
    return np.array([h.multi_label for h in heads], dtype=bool)
