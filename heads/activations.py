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
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function without overflow warnings for large |z|.

    ``1 / (1 + exp(-z))`` overflows ``exp`` for very negative z; writing it through
    ``exp(-|z|)`` keeps every intermediate in [0, 1].
    """
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(logits.dtype, copy=False)
