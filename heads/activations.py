"""Numerically stable softmax and sigmoid, shared by the single-head reference and the fleet.

Both the reference (``HeadArrays.predict_proba``) and the fleet go through these two functions,
so the only difference between them is how the logits are computed (one head vs. stacked heads).
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis. Entries at ``-inf`` (padding) come out as exactly 0.

    Every row must hold at least one finite logit; subtracting the row max keeps ``exp`` from
    overflowing for the large logits that a confident linear head produces.
    """
    e = np.exp(logits - _last_axis(np.maximum, logits))
    return e / _last_axis(np.add, e)


def _last_axis(op: np.ufunc, a: np.ndarray) -> np.ndarray:
    """``op.reduce`` over a short last axis, kept as [..., 1].

    numpy's reduce over a last axis of 2-10 entries (a head's labels) walks tiny strided rows
    and is several times slower than folding the columns with the ufunc itself.
    """
    if a.shape[-1] > 16:
        return op.reduce(a, axis=-1, keepdims=True)
    out = a[..., 0].copy()
    for j in range(1, a.shape[-1]):
        op(out, a[..., j], out=out)
    return out[..., None]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function without overflow warnings for large |z|.

    ``1 / (1 + exp(-z))`` overflows ``exp`` for very negative z; writing it through
    ``exp(-|z|)`` keeps every intermediate in [0, 1].
    """
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(logits.dtype, copy=False)
