"""Hit/miss accounting per tenant and per (tenant, classifier).

Figures are kept per tenant and a snapshot only ever reads one tenant's counters: a hit count
that mixed tenants would tell tenant B that somebody else sent the same text.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

TIER_NAMES = ("memory", "local", "redis")


@dataclasses.dataclass
class _Counts:
    lookups: int = 0
    misses: int = 0
    corrupt: int = 0
    hits: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIER_NAMES, 0))

    def add(self, tiers: Sequence[str | None], corrupt: int) -> None:
        self.lookups += len(tiers)
        self.corrupt += corrupt
        for tier in tiers:
            if tier is None:
                self.misses += 1
            else:
                self.hits[tier] = self.hits.get(tier, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        hit_total = sum(self.hits.values())
        return {
            "lookups": self.lookups,
            "hits": dict(self.hits),
            "misses": self.misses,
            "hit_rate": hit_total / self.lookups if self.lookups else 0.0,
            "corrupt": self.corrupt,
        }


@dataclasses.dataclass
class _Tenant:
    total: _Counts = dataclasses.field(default_factory=_Counts)
    computed: int = 0
    classifiers: dict[str, _Counts] = dataclasses.field(default_factory=dict)


class CacheStats:
    """Thread-safe counters; ``record`` is called once per ``TieredCache.lookup``.

    A classifier's figures count every key of the lookups it took part in: a request for
    classifiers ["spam", "legal"] over 10 texts adds 10 lookups to each.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}

    def _tenant(self, tenant: str) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
        return t

    def record(
        self, tenant: str, classifiers: Sequence[str], tiers: Sequence[str | None], corrupt: int = 0
    ) -> None:
        """``tiers[i]`` names the tier that answered key ``i``; ``None`` is a miss."""
        with self._lock:
            t = self._tenant(tenant)
            t.total.add(tiers, corrupt)
            for name in dict.fromkeys(classifiers):  # a classifier named twice counts once
                counts = t.classifiers.get(name)
                if counts is None:
                    counts = t.classifiers[name] = _Counts()
                counts.add(tiers, corrupt)

    def record_computed(self, tenant: str, n: int) -> None:
        """Embeddings the backbone computed for ``tenant`` (the misses that were filled)."""
        with self._lock:
            self._tenant(tenant).computed += int(n)

    def snapshot(self, tenant: str) -> dict[str, Any]:
        """This tenant's figures only; an unknown tenant gets zeros in the same shape.

        Per classifier: lookups, hits, misses, hit_rate, corrupt ("computed" is per tenant:
        one embedding serves every classifier of the request).
        """
        with self._lock:
            t = self._tenants.get(tenant) or _Tenant()
            out = t.total.as_dict()
            out["computed"] = t.computed
            out["classifiers"] = {name: c.as_dict() for name, c in t.classifiers.items()}
        return out

    def tenants(self) -> list[str]:
        """Tenants with any figures (for an operator's metrics export, never a tenant's reply)."""
        with self._lock:
            return list(self._tenants)
