"""Hit/miss accounting per tenant and per (tenant, classifier).

Figures are kept per tenant and a snapshot only ever reads one tenant's counters: a hit count
that mixed tenants would tell tenant B that somebody else sent the same text.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from headfleet.names import TIER_NAMES

BUCKET_S = 60  # the 1h window (and the dashboard's minute series) is summed from per-minute buckets
FINE_S = 10  # the 1m and 5m windows from 10-second buckets, so "1m" slides: the last 50 to 60 s
WINDOWS_S = {"1m": 60, "5m": 300, "1h": 3600}
FINE_WINDOWS = ("1m", "5m")


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

    def merge(self, other: "_Counts") -> None:
        self.lookups += other.lookups
        self.misses += other.misses
        self.corrupt += other.corrupt
        for tier, n in other.hits.items():
            self.hits[tier] = self.hits.get(tier, 0) + n

    def raw(self) -> list:
        """Compact form for another process (:meth:`CacheStats.export`): [lookups, misses, corrupt, hits]."""
        return [self.lookups, self.misses, self.corrupt, dict(self.hits)]

    @classmethod
    def from_raw(cls, raw: list) -> "_Counts":
        lookups, misses, corrupt, hits = raw
        return cls(int(lookups), int(misses), int(corrupt), {str(k): int(v) for k, v in hits.items()})

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
class _Bucket:
    """One minute (or 10 seconds) of a tenant's figures (for the recent windows)."""

    counts: _Counts = dataclasses.field(default_factory=_Counts)
    computed: int = 0
    fanout: int = 0  # classifier lookups beyond the first: embeddings shared instead of repeated

    def raw(self) -> list:
        return [self.counts.raw(), self.computed, self.fanout]

    def merge_raw(self, raw: list) -> None:
        counts, computed, fanout = raw
        self.counts.merge(_Counts.from_raw(counts))
        self.computed += int(computed)
        self.fanout += int(fanout)


@dataclasses.dataclass
class _Tenant:
    total: _Counts = dataclasses.field(default_factory=_Counts)
    computed: int = 0
    fanout: int = 0
    classifiers: dict[str, _Counts] = dataclasses.field(default_factory=dict)
    buckets: dict[int, _Bucket] = dataclasses.field(default_factory=dict)  # minute -> figures
    fine: dict[int, _Bucket] = dataclasses.field(default_factory=dict)  # 10-second slot -> figures

    def raw(self) -> dict[str, Any]:
        return {"total": self.total.raw(), "computed": self.computed, "fanout": self.fanout,
                "classifiers": {n: c.raw() for n, c in self.classifiers.items()},
                "buckets": {str(m): b.raw() for m, b in self.buckets.items()},
                "fine": {str(m): b.raw() for m, b in self.fine.items()}}

    def merge_raw(self, raw: dict[str, Any]) -> None:
        """Add another process's figures of the same tenant (buckets line up: they are absolute
        minutes, and 10-second slots, since the epoch)."""
        self.total.merge(_Counts.from_raw(raw["total"]))
        self.computed += int(raw["computed"])
        self.fanout += int(raw["fanout"])
        for name, c in raw["classifiers"].items():
            self.classifiers.setdefault(name, _Counts()).merge(_Counts.from_raw(c))
        fine = raw.get("fine")
        if fine is None:  # a process of an older version keeps minute buckets only: each counts at its
            # minute's first 10 seconds, so its figures still reach "1m" and "5m", less finely placed
            fine = {str(int(m) * (BUCKET_S // FINE_S)): b for m, b in raw["buckets"].items()}
        for into, got in ((self.buckets, raw["buckets"]), (self.fine, fine)):
            for slot, bucket in got.items():
                into.setdefault(int(slot), _Bucket()).merge_raw(bucket)

    def bucket(self, now: float) -> tuple[_Bucket, _Bucket]:
        """The minute bucket and the 10-second bucket ``now`` falls in (made, and the ones past
        every window they serve dropped, at a new bucket's start)."""
        return (_slot(self.buckets, int(now // BUCKET_S), WINDOWS_S["1h"] // BUCKET_S),
                _slot(self.fine, int(now // FINE_S), max(WINDOWS_S[w] for w in FINE_WINDOWS) // FINE_S))


def _slot(buckets: dict[int, _Bucket], slot: int, keep: int) -> _Bucket:
    b = buckets.get(slot)
    if b is None:
        b = buckets[slot] = _Bucket()
        for old in [m for m in buckets if m <= slot - keep]:
            del buckets[old]
    return b


def _summary(counts: _Counts, computed: int, fanout: int) -> dict[str, Any]:
    out = counts.as_dict()
    out["computed"] = computed
    # every lookup not computed was served without a backbone forward: a cache hit, or a
    # repeat of a text inside the same request or batch
    out["embeddings_avoided"] = max(0, counts.lookups - computed)
    out["fanout_saved"] = fanout
    return out


class CacheStats:
    """Thread-safe counters; ``record`` is called once per ``TieredCache.lookup``.

    A classifier's figures count every key of the lookups it took part in: a request for
    classifiers ["spam", "legal"] over 10 texts adds 10 lookups to each.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}
        self._dirty: set[str] = set()  # tenants changed since the last export
        self._clock = clock
        self.started = clock()

    def _tenant(self, tenant: str) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
        return t

    def record(
        self, tenant: str, classifiers: Sequence[str], tiers: Sequence[str | None], corrupt: int = 0
    ) -> None:
        """``tiers[i]`` names the tier that answered key ``i``; ``None`` is a miss."""
        names = list(dict.fromkeys(classifiers))  # a classifier named twice counts once
        fanout = len(tiers) * max(0, len(names) - 1)
        with self._lock:
            self._dirty.add(tenant)
            t = self._tenant(tenant)
            t.total.add(tiers, corrupt)
            t.fanout += fanout
            for b in t.bucket(self._clock()):
                b.counts.add(tiers, corrupt)
                b.fanout += fanout
            for name in names:
                counts = t.classifiers.get(name)
                if counts is None:
                    counts = t.classifiers[name] = _Counts()
                counts.add(tiers, corrupt)

    def record_computed(self, tenant: str, n: int) -> None:
        """Embeddings the backbone computed for ``tenant`` (the misses that were filled)."""
        with self._lock:
            self._dirty.add(tenant)
            t = self._tenant(tenant)
            t.computed += int(n)
            for b in t.bucket(self._clock()):
                b.computed += int(n)

    def export(self, *, changed_only: bool = True) -> dict[str, dict[str, Any]]:
        """Tenant -> its raw figures (JSON-able), for the other processes of a serving group
        (``service.peers``): the tenants changed since the last export, or all of them."""
        with self._lock:
            names = list(self._dirty) if changed_only else list(self._tenants)
            self._dirty.clear()
            return {n: self._tenants[n].raw() for n in names if n in self._tenants}

    def snapshot(self, tenant: str, peers: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """This tenant's figures only; an unknown tenant gets zeros in the same shape.

        Per classifier: lookups, hits, misses, hit_rate, corrupt ("computed" is per tenant:
        one embedding serves every classifier of the request). ``windows`` holds the same
        tenant figures over the last minute, 5 minutes and hour, each a sliding window of whole
        buckets ending with the one running now: ``1m`` and ``5m`` of 10-second buckets (they
        cover the last 50-60 s and 290-300 s), ``1h`` of minute buckets (59-60 min). ``peers``:
        the same tenant's raw figures from the other processes serving the folder
        (:meth:`export`), added in.
        """
        if peers:
            return self.merged(tenant, peers).snapshot(tenant)
        now = self._clock()
        with self._lock:
            t = self._tenants.get(tenant) or _Tenant()
            out = _summary(t.total, t.computed, t.fanout)
            out["classifiers"] = {name: c.as_dict() for name, c in t.classifiers.items()}
            windows = {}
            for label, span in WINDOWS_S.items():
                width, buckets = (FINE_S, t.fine) if label in FINE_WINDOWS else (BUCKET_S, t.buckets)
                current = int(now // width)
                counts, computed, fanout = _Counts(), 0, 0
                for m, b in buckets.items():
                    if current - span // width < m <= current + 1:  # + 1: a peer whose clock runs a little ahead
                        counts.merge(b.counts)
                        computed += b.computed
                        fanout += b.fanout
                windows[label] = _summary(counts, computed, fanout)
        out["windows"] = windows
        return out

    def merged(self, tenant: str, peers: Sequence[dict[str, Any]]) -> "CacheStats":
        """A CacheStats holding ``tenant``'s figures only: this one's plus ``peers``' raw figures of
        the same tenant (the other processes of a serving group), on the same clock."""
        out = CacheStats(self._clock)
        out.started = self.started
        t = out._tenant(tenant)
        with self._lock:
            own = self._tenants.get(tenant)
            if own is not None:
                t.merge_raw(own.raw())
        for raw in peers:
            t.merge_raw(raw)
        return out

    def tenants(self) -> list[str]:
        """Tenants with any figures (for an operator's metrics export, never a tenant's reply)."""
        with self._lock:
            return list(self._tenants)
