"""Monitor windows: what a version saw in one stretch of live traffic, and its signals once closed.

An **open window** accumulates, per classifier version, the /classify texts it scored: how many,
the predicted-label counts, and two bounded reservoirs (Vitter's algorithm R) — the confidences
and the embeddings — so its size does not grow with traffic. It closes after ``window_texts``
texts (exactly: a request that crosses the boundary is split) or, without a count, after
``window_seconds``. Closing computes the signals against the version's reference profile:

    label_psi, label_js   predicted labels vs the version's own predictions on its training texts (PSI; JS)
    confidence_ks         confidences vs the holdout's (two-sample Kolmogorov–Smirnov statistic)
    estimated_accuracy    mean max probability (CBPE) when the version is calibrated, else null
    domain_auc, mmd2      embedding sample vs the training sample (domain classifier ROC AUC; MMD²)
    canary_accuracy       accuracy (and macro-F1) on the canary set, null without one

and the two decisions: ``drift`` (PSI above ``psi`` or domain AUC above ``domain_auc``; the
others are reported, not voted) and ``accuracy_drop`` (canary accuracy below ``accuracy_slo``
or more than ``accuracy_drop`` under the holdout accuracy; never without canary data).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from headfleet.lifecycle import signals
from headfleet.lifecycle.feedback import label_counts
from headfleet.lifecycle.profile import Profile
from headfleet.lifecycle.reservoir import Reservoir
from headfleet.lifecycle.settings import MonitorSettings


def iso(ts: float) -> str:
    """Epoch seconds -> ISO 8601 UTC with a ``Z`` (``2026-11-29T21:00:00Z``)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class OpenWindow:
    start: float  # epoch seconds of the first text
    texts: int
    labels: Counter
    confidences: Reservoir  # [<= capacity] confidences
    vectors: Reservoir  # [<= capacity, dim] embeddings

    @classmethod
    def new(cls, start: float, capacity: int, dim: int) -> "OpenWindow":
        return cls(start, 0, Counter(), Reservoir(capacity), Reservoir(capacity, dim))

    def add(self, labels: Sequence, confidences: np.ndarray, vectors: np.ndarray, rng: np.random.Generator) -> None:
        """Rows i of ``labels`` [n], ``confidences`` [n] and ``vectors`` [n, dim] are one text each."""
        self.texts += len(labels)
        self.labels.update(label_counts(labels))
        self.confidences.add(np.asarray(confidences, dtype=np.float32).reshape(-1), rng)
        self.vectors.add(np.asarray(vectors, dtype=np.float32), rng)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = {"start": self.start, "texts": self.texts, "labels": dict(self.labels)}
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 confidences=np.frombuffer(self.confidences.to_bytes(), dtype=np.uint8),
                 vectors=np.frombuffer(self.vectors.to_bytes(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "OpenWindow":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            return cls(meta["start"], meta["texts"], Counter(meta["labels"]),
                       Reservoir.from_bytes(z["confidences"].tobytes()), Reservoir.from_bytes(z["vectors"].tobytes()))


@dataclasses.dataclass(frozen=True)
class Canary:
    accuracy: float | None
    macro_f1: float | None
    size: int


def close_window(window: OpenWindow, end: float, profile: Profile | None, canary: Canary,
                 settings: MonitorSettings, seed: int = 0) -> dict[str, Any]:
    """The closed window's report: times, counts, every signal (null where it cannot be computed:
    no profile, too few rows, no canary) and the ``drift`` / ``accuracy_drop`` decisions."""
    conf = window.confidences.sample
    vecs = window.vectors.sample
    out: dict[str, Any] = {"start": iso(window.start), "end": iso(end), "texts": window.texts,
                           "label_psi": None, "label_js": None, "confidence_ks": None, "domain_auc": None,
                           "mmd2": None, "canary_accuracy": canary.accuracy, "canary_macro_f1": canary.macro_f1,
                           "canary_size": canary.size, "estimated_accuracy": None,
                           "predicted": dict(sorted(window.labels.items()))}
    if profile is not None:
        current = dict(window.labels)
        out["label_psi"] = _round(signals.psi(profile.label_dist, current))
        out["label_js"] = _round(signals.label_js(profile.label_dist, current))
        out["confidence_ks"] = _round(signals.confidence_ks(profile.confidences, conf))
        drift = signals.embedding_drift(profile.vectors, vecs, seed=seed)  # one Gram matrix for both
        out["domain_auc"], out["mmd2"] = _round(drift.domain_auc), _round(drift.mmd2)
        if profile.calibrated:
            out["estimated_accuracy"] = _round(signals.estimated_accuracy(conf))
    psi, auc = out["label_psi"], out["domain_auc"]
    out["drift"] = bool((psi is not None and psi > settings.psi) or (auc is not None and auc > settings.domain_auc))
    acc = canary.accuracy
    holdout = profile.holdout_accuracy if profile is not None else None
    out["accuracy_drop"] = bool(acc is not None and (
        (settings.accuracy_slo is not None and acc < settings.accuracy_slo)
        or (holdout is not None and acc < holdout - settings.accuracy_drop)))
    return out


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)
