"""Fit a head on embeddings the caller computed, and measure it on a holdout split.

The head that ships is the one fitted on the train split, so the holdout metrics describe
exactly the weights in the registry (refitting on everything would ship an unmeasured head).
Metrics are computed with ``HeadArrays.predict_proba`` — the converted head — not with the
sklearn estimator, for the same reason. sklearn warnings raised while fitting (no convergence,
a label constant in the train split) are recorded in the metrics, never swallowed.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headfleet.errors import TrainingDataError, ValidationError
from headfleet.heads.examples import Examples
from headfleet.heads.metrics import classification_metrics
from headfleet.heads.split import holdout_split
from headfleet.heads.types import KINDS, HeadArrays
from headfleet.heads.validation import ValidationReport, validate

LOGREG_MAX_ITER = 2000
MLP_HIDDEN = (64,)
MLP_MAX_ITER = 500


@dataclass
class TrainedHead:
    head: HeadArrays
    metrics: dict[str, Any]  # holdout: accuracy, macro_f1, per_class, n_train, n_holdout, fit_warnings, ...
    report: ValidationReport | None = field(default=None)  # the data report the training went ahead on


DEFAULT_HOLDOUT = 0.2  # the share of examples held out to measure a head (heads.split.holdout_split)


def train_head(
    X: np.ndarray,
    examples: Examples,
    kind: str = "logreg",
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
    report: ValidationReport | None = None,
    refit: bool = False,
) -> TrainedHead:
    """Fit ``kind`` ("logreg" | "mlp") on X [n, d] (row i embeds ``examples.texts[i]``).

    ``report``: pass the result of ``validate`` when the caller already ran it (for instance
    with token stats); otherwise the data is validated here, so bad data is always refused.
    ``holdout``: fraction held out; 0 trains on everything and reports no holdout metrics.
    ``refit``: after measuring on the holdout, fit again on every example and ship that head
    (with few labels the held-out fifth is worth having); ``metrics["n_shipped"]`` says which.
    """
    if kind not in KINDS:
        raise ValidationError(f"unknown head kind {kind!r}; expected one of {list(KINDS)}")
    if not 0.0 <= holdout < 1.0:
        raise ValidationError(f"holdout must be in [0, 1), got {holdout}")
    if report is None:
        report = validate(examples)
    X = _check_embeddings(X, len(examples))
    classes = examples.classes()
    y = examples.targets()
    train_idx, test_idx = holdout_split(y, examples.multi_label, holdout, seed)

    model = _estimator(kind, examples.multi_label, seed)
    caught = _fit(model, X[train_idx], y[train_idx])
    if not examples.multi_label and len(model.classes_) != len(classes):
        raise TrainingDataError(f"the train split lacks some classes ({len(model.classes_)} of {len(classes)}); add examples")
    head = HeadArrays.from_sklearn(model, labels=classes, multi_label=examples.multi_label)

    metrics: dict[str, Any] = {
        "kind": kind,
        "seed": seed,
        "holdout_fraction": holdout,
        "n_train": int(len(train_idx)),
        "n_holdout": int(len(test_idx)),
        "fit_warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    }
    if len(test_idx):
        probs = head.predict_proba(X[test_idx])
        pred = (probs >= 0.5).astype(int) if examples.multi_label else probs.argmax(axis=1)
        metrics.update(classification_metrics(y[test_idx], pred, classes, examples.multi_label))
    metrics["n_shipped"] = int(len(train_idx))
    if refit and len(test_idx):
        model = _estimator(kind, examples.multi_label, seed)
        caught = _fit(model, X, y)
        head = HeadArrays.from_sklearn(model, labels=classes, multi_label=examples.multi_label)
        metrics["n_shipped"] = int(len(y))
        metrics["fit_warnings"] = sorted(set(metrics["fit_warnings"]) | {f"{w.category.__name__}: {w.message}" for w in caught})
    return TrainedHead(head=head, metrics=metrics, report=report)


_ONE_BLAS_THREAD = threading.Lock()


def _fit(model, X: np.ndarray, y: np.ndarray) -> list:
    """``model.fit(X, y)`` with one BLAS thread; returns the warnings it raised.

    The same data and seed must give the same weights, bit for bit: ``headfleet backbone apply``
    refuses a head that hashes unlike the one its plan staged, and ``headfleet reproduce``
    compares retrained weights. OpenBLAS's results depend on how many threads a call gets (an MLP
    fitted with 2 threads and with 1 differs), and a call made while another thread uses BLAS
    (the service scoring heads beside a training job) can get fewer. One thread, set for the
    fit's duration (``threadpoolctl``, process-wide), under a lock so two fits never restore the
    count under each other, removes both. Heads are small: the fit barely slows, and BLAS calls of
    other threads run on one thread meanwhile."""
    from threadpoolctl import threadpool_limits

    with _ONE_BLAS_THREAD, threadpool_limits(limits=1, user_api="blas"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, y)
    return caught


def _check_embeddings(X: np.ndarray, n: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != n:
        raise ValidationError(f"expected embeddings of shape [{n}, d] (one row per example), got {X.shape}")
    if not np.issubdtype(X.dtype, np.floating) or not np.isfinite(X).all():
        raise ValidationError("embeddings must be finite floats")
    return X


def _estimator(kind: str, multi_label: bool, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neural_network import MLPClassifier

    if kind == "mlp":
        return MLPClassifier(hidden_layer_sizes=MLP_HIDDEN, max_iter=MLP_MAX_ITER, early_stopping=False, random_state=seed)
    logreg = LogisticRegression(max_iter=LOGREG_MAX_ITER)
    return OneVsRestClassifier(logreg) if multi_label else logreg
