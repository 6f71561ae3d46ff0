"""Guardrail counters of an experiment arm: requests, errors and a latency histogram that replicas
merge by adding.

Latencies go into ``BUCKETS`` log-spaced buckets from 0.1 ms to 100 s (about 4.7 % wide each), so
a percentile read back is the upper edge of its bucket: at most one bucket (~5 %) above the true
value, never below it — a guardrail judged on it errs towards stopping. Counts are plain integer
lists, so each replica stores its own and a reader sums them (no lost update between replicas).
"""

from __future__ import annotations

import math
from typing import Sequence

LOW_MS, HIGH_MS, BUCKETS = 0.1, 100_000.0, 300
_STEP = math.log(HIGH_MS / LOW_MS) / (BUCKETS - 1)


def bucket(ms: float) -> int:
    """The histogram bucket of a latency in milliseconds (below 0.1 ms: 0; above 100 s: the last)."""
    if ms <= LOW_MS:
        return 0
    return min(BUCKETS - 1, int(math.ceil(math.log(ms / LOW_MS) / _STEP)))


def upper_edge(i: int) -> float:
    """The largest latency (ms) bucket ``i`` holds."""
    return LOW_MS * math.exp(i * _STEP)


def new_counts() -> dict:
    return {"requests": 0, "errors": 0, "hist": [0] * BUCKETS}


def add(counts: dict, ms: float | None, error: bool) -> None:
    """Count one request: its latency (None for a failed request, which has none) and whether it failed."""
    counts["requests"] += 1
    counts["errors"] += int(error)
    if ms is not None:
        counts["hist"][bucket(ms)] += 1


def merge(many: Sequence[dict]) -> dict:
    """The sum of several replicas' counts."""
    out = new_counts()
    for c in many:
        out["requests"] += int(c.get("requests", 0))
        out["errors"] += int(c.get("errors", 0))
        for i, n in enumerate(c.get("hist", [])[:BUCKETS]):
            out["hist"][i] += int(n)
    return out


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of the latencies counted in ``hist``, in ms (the bucket's upper
    edge, rounded to 0.01 ms); None when nothing was counted."""
    total = sum(hist)
    if not total:
        return None
    rank = math.ceil(q / 100.0 * total)
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= max(rank, 1):
            return round(upper_edge(i), 2)
    return round(upper_edge(len(hist) - 1), 2)


def status(counts: dict, limits: dict) -> dict:
    """``{"requests", "errors", "error_rate", "p99_ms", "breached": [names]}`` against ``limits``
    (``{"p99_ms": ..., "error_rate": ...}``, each optional)."""
    requests = counts["requests"]
    rate = counts["errors"] / requests if requests else None
    p99 = percentile(counts["hist"], 99)
    breached = []
    if "p99_ms" in limits and p99 is not None and p99 > limits["p99_ms"]:
        breached.append("p99_ms")
    if "error_rate" in limits and rate is not None and rate > limits["error_rate"]:
        breached.append("error_rate")
    return {"requests": requests, "errors": counts["errors"],
            "error_rate": None if rate is None else round(rate, 6), "p99_ms": p99, "breached": breached}
