"""Holdout metrics as plain JSON-ready Python values (they go straight into manifests)."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], multi_label: bool) -> dict[str, Any]:
    """accuracy, macro_f1 and per-class precision/recall/f1/support.

    Single-label: y_true/y_pred are label-index vectors [n]. Multi-label: 0/1 indicator
    matrices [n, L]; accuracy is exact-set (subset) accuracy, and micro_f1 and the share of
    correct label decisions (label_accuracy) are added because subset accuracy alone is harsh.
    Classes absent from the holdout get support 0 and are listed in ``absent_from_holdout``
    rather than silently dropped.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    idx = list(range(len(labels)))
    kwargs: dict[str, Any] = {"zero_division": 0}
    if not multi_label:
        kwargs["labels"] = idx
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, **kwargs)
    support = np.asarray(s)
    present = support > 0
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # macro over the classes that the holdout actually holds: an absent class has no recall to average
        "macro_f1": float(np.mean(np.asarray(f)[present])) if present.any() else 0.0,
        "per_class": {
            labels[i]: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i in idx
        },
        "absent_from_holdout": [labels[i] for i in idx if not present[i]],
    }
    if multi_label:
        out["micro_f1"] = float(f1_score(y_true, y_pred, average="micro", zero_division=0))
        out["label_accuracy"] = float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
    return out
