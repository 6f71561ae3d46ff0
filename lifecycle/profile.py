"""A version's reference profile: what "no drift" looks like for it.

The registry keeps a version's training texts, not their vectors, so the first time a version is
monitored its stored training data goes through the engine once (the cache answers what it has
seen; the service runs the misses on the tenant's monitor lane) and the profile is kept in the
state store (``<tenant>/<name>/v<N>/profile``), never in the immutable version folder:

- ``label_dist``: the proportions of the labels the version itself *predicts* on its training
  texts — the reference of the predicted-label PSI. Not the training labels' proportions: a
  head with imperfect recall predicts its minority labels less often than they were labelled
  (an SMS spam head labelled 14 % spam predicts 8 %), so predictions against labels showed drift
  where there was none (9 of 40 in-distribution windows of 256 texts over PSI 0.1; 0 of 40
  against the version's own predictions);
- ``training_dist``: the training labels' proportions, for the report;
- ``confidences``: the version's confidences on its own holdout rows (the same split training
  used, ``heads.split.holdout_split`` with the version's seed) — the reference of the KS test;
- ``holdout_accuracy``: from the manifest (``metrics.accuracy``);
- ``calibrated``: whether the mean holdout confidence is within ``CALIBRATION_TOLERANCE`` of the
  holdout accuracy — only then is the confidence-based accuracy estimate (CBPE) reported;
- ``vectors``: a seeded uniform sample of at most ``size`` training embeddings [r, dim] float32
  (the reference of the domain classifier and MMD²).
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Sequence

import numpy as np

from headfleet.engine import Compute, Engine
from headfleet.heads.retrain import stored_examples
from headfleet.lifecycle.feedback import label_counts
from headfleet.lifecycle.probe import confidences, predictions, score_version

CALIBRATION_TOLERANCE = 0.05  # |mean confidence - accuracy| on the holdout that still counts as calibrated


@dataclasses.dataclass
class Profile:
    version: int
    label_dist: dict[str, float]
    training_dist: dict[str, float]
    confidences: np.ndarray  # [h] float32 holdout confidences
    vectors: np.ndarray  # [r, dim] float32 sample of training embeddings
    holdout_accuracy: float | None
    calibrated: bool
    training_size: int

    def to_bytes(self) -> bytes:
        meta = {"version": self.version, "label_dist": self.label_dist, "training_dist": self.training_dist,
                "holdout_accuracy": self.holdout_accuracy,
                "calibrated": self.calibrated, "training_size": self.training_size}
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 confidences=self.confidences.astype(np.float32), vectors=self.vectors.astype(np.float32))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Profile":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            return cls(confidences=z["confidences"], vectors=z["vectors"], **meta)


def label_distribution(labels: Sequence) -> dict[str, float]:
    """Proportion of each label; for multi-label rows each label of a row counts once."""
    counts = label_counts(labels)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


def holdout_rows(examples, seed: int) -> np.ndarray:
    """The rows training held out for ``examples`` with ``seed`` (the same split ``train_head`` made)."""
    from headfleet.heads.split import holdout_split
    from headfleet.heads.train import DEFAULT_HOLDOUT

    return holdout_split(examples.targets(), examples.multi_label, DEFAULT_HOLDOUT, seed).holdout


def build_profile(engine: Engine, tenant: str, manifest: dict, *, size: int = 256, seed: int = 0,
                  compute: Compute | None = None) -> Profile | None:
    """The profile of the version ``manifest`` names; None when it has no stored training data
    (saved before data was stored). Raises what :func:`score_version` raises."""
    examples = stored_examples(engine.registry, tenant, manifest)
    if examples is None:
        return None
    ref = f"{manifest['name']}@{manifest['version']}"
    probe = score_version(engine, tenant, ref, examples.texts, compute=compute)
    train_seed = int((manifest.get("metrics") or {}).get("seed") or 0)
    hold = holdout_rows(examples, train_seed)
    rows = hold if len(hold) else np.arange(len(examples))
    conf = confidences(probe.probs[rows], probe.multi_label).astype(np.float32)
    acc = (manifest.get("metrics") or {}).get("accuracy")
    if acc is None:
        acc = (manifest.get("metrics") or {}).get("holdout_accuracy")
    calibrated = (not probe.multi_label and acc is not None and len(conf) > 0
                  and abs(float(conf.mean()) - float(acc)) <= CALIBRATION_TOLERANCE)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(examples), size=min(size, len(examples)), replace=False))
    predicted = predictions(probe.probs, probe.labels, probe.multi_label)
    return Profile(version=int(manifest["version"]), label_dist=label_distribution(predicted),
                   training_dist=label_distribution(examples.labels),
                   confidences=conf, vectors=np.ascontiguousarray(probe.vectors[pick], dtype=np.float32),
                   holdout_accuracy=None if acc is None else float(acc), calibrated=bool(calibrated),
                   training_size=len(examples))
