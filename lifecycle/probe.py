"""Score texts with one classifier version outside live traffic (canary sets, reference profiles).

It goes through the engine's one request driver with the caller's ``compute`` (the service
passes one that runs misses through the scheduler on the tenant's monitor lane), so a cached
text costs a head operation and no forward. It is ``quiet``: no observer is called (none of this
counts as traffic in a monitor window) and the tenant's cache statistics stay the tenant's own
requests.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from headfleet.engine import Compute, Engine


class Probe(NamedTuple):
    vectors: np.ndarray  # [n, dim] float32: the embeddings the version reads (its adapter's for LoRA)
    probs: np.ndarray  # [n, k] float32: per label, in ``labels`` order (sigmoids for multi-label)
    labels: list[str]
    multi_label: bool


def score_version(engine: Engine, tenant: str, ref: str, texts: Sequence[str], *,
                  compute: Compute | None = None) -> Probe:
    """``ref`` ("spam@3") on ``texts``; raises NotFoundError when the version is gone, and what the
    engine raises for a corrupt or unservable version (CorruptVersionError, BackendError)."""
    resolved = engine.resolve(tenant, [ref], pin=True)
    try:
        groups = engine.plan(tenant, resolved)
        batch = engine.embed_request(tenant, list(texts), [(ns, [m["name"] for _, _, m in items])
                                                           for ns, items in groups], compute=compute,
                                     quiet=True)[0]
        out = engine.fleet.predict(batch.vectors, [resolved[0][1]])
    finally:
        engine.release(resolved)
    k = int(out.n_labels[0])
    return Probe(batch.vectors, np.ascontiguousarray(out.probs[:, 0, :k]), list(out.labels[0]),
                 bool(out.multi_label[0]))


def predictions(probs: np.ndarray, labels: Sequence[str], multi_label: bool) -> list:
    """Labels from probabilities [n, k]: the argmax label (single-label) or the sorted set at >= 0.5."""
    if multi_label:
        return [sorted(labels[j] for j in np.flatnonzero(row >= 0.5)) for row in probs]
    return [labels[j] for j in probs.argmax(1)]


def confidences(probs: np.ndarray, multi_label: bool) -> np.ndarray:
    """[n] float: the max probability (single-label); for multi-label the mean over labels of
    max(p, 1 - p), the confidence in each yes/no decision."""
    if multi_label:
        return np.maximum(probs, 1 - probs).mean(1)
    return probs.max(1)
