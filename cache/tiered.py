"""The cache as the service sees it: tiers asked in order, hits promoted upward.

memory LRU -> local FAISS store -> Redis. A key is asked of a tier only if every tier above
missed it; a hit is written into every tier above the one that answered, so the next lookup
is served from the fastest tier. A tier that raises is logged and counted and treated as a
miss (on lookup) or skipped (on store): one broken tier never fails a request.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from .base import CORRUPT, Tier, check_batch
from .stats import CacheStats

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Lookup:
    """Per input key: its vector (or None), the tier that answered (or None); corrupt count."""

    vectors: list[np.ndarray | None]
    tiers: list[str | None]
    corrupt: int
    corrupt_at: list[int] = dataclasses.field(default_factory=list)  # per position, for split lookups

    @property
    def missing(self) -> list[int]:
        """Positions the caller must compute and ``store``."""
        return [i for i, v in enumerate(self.vectors) if v is None]


class TieredCache:
    """Ordered tiers plus optional stats; ``tier_errors`` counts exceptions per tier name."""

    def __init__(self, tiers: list[Tier], stats: CacheStats | None = None):
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.stats = stats
        self.tier_errors: dict[str, int] = dict.fromkeys(names, 0)
        self.promotions_skipped = 0  # hits not promoted into a tier that needs namespaces

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def n_local(self) -> int:
        """How many leading tiers live in this process (asked inline; the rest are remote)."""
        n = 0
        for t in self.tiers:
            if getattr(t, "remote", False):
                break
            n += 1
        return n

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def _failed(self, tier: Tier, what: str) -> None:
        self.tier_errors[tier.name] += 1
        log.exception("cache tier %r failed during %s", tier.name, what)

    def lookup(
        self,
        keys: list[bytes],
        tenant: str,
        classifiers: Sequence[str] = (),
        namespaces: list[str] | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
        record: bool = True,
    ) -> Lookup:
        """Find ``keys`` tier by tier; duplicates are asked once and answered at every position.

        ``namespaces[i]`` is the namespace of ``keys[i]``; without it, lower-tier hits are
        still promoted into tiers that do not need a namespace (memory) but not into the
        local store, and the skipped promotions are counted.

        ``start``/``stop`` ask only ``tiers[start:stop]`` (the service asks the in-process
        tiers inline and Redis from the batch worker); a hit is still promoted into every tier
        above it. ``record=False`` leaves the stats to the caller, who records the final
        answer of a split lookup once.
        """
        if namespaces is not None and len(namespaces) != len(keys):
            raise ValueError("namespaces must have one entry per key")
        unique = list(dict.fromkeys(keys))
        ns_of = dict(zip(keys, namespaces)) if namespaces is not None else None
        found: dict[bytes, tuple[np.ndarray, str]] = {}
        corrupt_keys: dict[bytes, int] = {}
        pending = unique
        for level, tier in enumerate(self.tiers):
            if level < start or (stop is not None and level >= stop):
                continue
            if not pending:
                break
            try:
                answers = tier.get_many(pending)
            except Exception:
                self._failed(tier, "get_many")
                continue
            hits: list[bytes] = []
            still: list[bytes] = []
            for key, ans in zip(pending, answers):
                if ans is CORRUPT:
                    corrupt_keys[key] = corrupt_keys.get(key, 0) + 1
                    still.append(key)
                elif ans is None:
                    still.append(key)
                else:
                    found[key] = (ans, tier.name)
                    hits.append(key)
            if hits and level > 0:
                self._promote(self.tiers[:level], hits, [found[k][0] for k in hits], ns_of)
            pending = still
        vectors: list[np.ndarray | None] = []
        tiers: list[str | None] = []
        corrupt_at = [corrupt_keys.get(key, 0) for key in keys]
        for key in keys:
            hit = found.get(key)
            vectors.append(hit[0] if hit else None)
            tiers.append(hit[1] if hit else None)
        corrupt = sum(corrupt_at)
        if record and self.stats is not None:
            self.stats.record(tenant, classifiers, tiers, corrupt)
        return Lookup(vectors=vectors, tiers=tiers, corrupt=corrupt, corrupt_at=corrupt_at)

    def _promote(
        self,
        upper: list[Tier],
        keys: list[bytes],
        rows: list[np.ndarray],
        ns_of: dict[bytes, str] | None,
    ) -> None:
        batch = np.stack(rows).astype(np.float32, copy=False)
        namespaces = [ns_of[k] for k in keys] if ns_of is not None else [""] * len(keys)
        for tier in upper:
            if ns_of is None and tier.needs_namespace:
                self.promotions_skipped += len(keys)
                continue
            try:
                tier.put_many(keys, batch, namespaces)
            except Exception:
                self._failed(tier, "promotion")

    def store(self, keys: list[bytes], vectors: np.ndarray, namespaces: list[str], *,
              start: int = 0, stop: int | None = None) -> None:
        """Write computed vectors ([n, dim] float32) to ``tiers[start:stop]`` (all by default);
        a failing tier is skipped.

        A malformed batch (wrong dtype, shape or lengths) is the caller's bug, not a tier
        failure, so it raises here instead of being logged once per tier.
        """
        check_batch(keys, vectors, namespaces)
        if not keys:
            return
        for tier in self.tiers[start:stop]:
            try:
                tier.put_many(keys, vectors, namespaces)
            except Exception:
                self._failed(tier, "put_many")

    def nbytes(self) -> dict[str, int]:
        return {t.name: t.nbytes() for t in self.tiers}

    def held(self, namespace: str) -> dict[str, dict[str, int]]:
        """Entries and bytes one namespace holds, per tier that can tell (not Redis: it would
        take a SCAN of every replica's keys)."""
        out = {}
        for t in self.tiers:
            fn = getattr(t, "held", None)
            if fn is not None:
                entries, nbytes = fn(namespace)
                out[t.name] = {"entries": entries, "bytes": nbytes}
        return out

    def close(self) -> None:
        """Close every tier (the local store saves if dirty, Redis disconnects)."""
        for tier in self.tiers:
            try:
                tier.close()
            except Exception:
                self._failed(tier, "close")
