"""What the dashboard shows, read from the same objects the JSON endpoints read.

Each function names the endpoint whose figures it repeats, so a page and that endpoint read at
the same moment agree (the browser tests check it): ``stats_view`` is ``GET /stats``,
``service.monitor.report`` is ``GET /classifiers/{name}/monitor``, ``service.shadows.report`` is
``GET /classifiers/{name}/shadow``, ``service.experiments.report`` is ``GET /experiments/{id}``.
Everything here blocks (files, locks): call it off the event loop.

Two small adapters read what no public method offers yet, each saying so where it is used:
``minute_series`` (the per-minute buckets ``CacheStats`` sums its windows from) and
``classifier_names`` (the registry's classifier folders, without reading every manifest, so a
page of 50 out of 1,000 classifiers reads 50 manifests, not 1,000).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

from headfleet.errors import NotFoundError
from headfleet.names import NAME_RE, TIER_NAMES

PAGE_SIZE = 50


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a filtered listing: ``items`` are ``names[(number-1)*size : number*size]``."""

    items: list[str]
    number: int  # 1-based
    size: int  # names per page
    pages: int  # at least 1
    matched: int  # names matching the query
    total: int  # names before the query
    query: str


def paginate(names: Sequence[str], query: str, number: int, size: int = PAGE_SIZE) -> Page:
    """Case-insensitive substring filter, then page ``number`` (clamped to the last page)."""
    q = query.strip().lower()
    hits = [n for n in names if q in n.lower()] if q else list(names)
    pages = max(1, math.ceil(len(hits) / size))
    number = min(max(1, number), pages)
    return Page(hits[(number - 1) * size: number * size], number, size, pages, len(hits), len(names), query.strip())


def stats_view(service, tenant: str, group=None) -> dict[str, Any]:
    """Exactly what ``GET /stats`` answers for ``tenant`` (``service.peers.stats_report``; ``group``:
    the other workers' part, ``read_group``); only this tenant's counters are read."""
    from headfleet.service.peers import stats_report

    return stats_report(service, tenant, group)


def forwards_saved(avoided: int, batch_texts: int) -> int:
    """Backbone forwards the avoided embeddings would have cost at ``batch_texts`` texts a batch
    (the figure batch scoring reports as 'saved by the cache'): ceil(avoided / batch_texts)."""
    return math.ceil(avoided / batch_texts) if avoided > 0 and batch_texts > 0 else 0


def minute_series(cache_stats, tenant: str, minutes: int = 60) -> list[dict[str, Any]] | None:
    """The tenant's last ``minutes`` one-minute buckets, oldest first: ``{"minute": epoch s of the
    minute's start, "lookups", "hits": {tier: n}, "misses", "computed", "hit_rate"}`` (minutes
    without traffic included as zeros). Adapter: reads ``CacheStats``' private per-minute buckets
    (the ones ``/stats`` sums into its 1h window; 1m and 5m come from 10-second buckets) under its lock; returns None when
    that class no longer keeps them, and the page says the series is unavailable."""
    lock, tenants = getattr(cache_stats, "_lock", None), getattr(cache_stats, "_tenants", None)
    clock = getattr(cache_stats, "_clock", time.time)
    if lock is None or not isinstance(tenants, dict):
        return None
    now = clock()
    last = int(now // 60)
    rows: dict[int, dict[str, Any]] = {}
    with lock:
        t = tenants.get(tenant)
        try:
            for m, b in (t.buckets.items() if t is not None else ()):
                if m > last - minutes:
                    c = b.counts
                    rows[m] = {"lookups": c.lookups, "hits": {k: c.hits.get(k, 0) for k in TIER_NAMES},
                               "misses": c.misses, "computed": b.computed}
        except (AttributeError, TypeError):  # CacheStats changed shape: say so on the page, never a 500
            return None
    out = []
    for m in range(last - minutes + 1, last + 1):
        r = rows.get(m) or {"lookups": 0, "hits": dict.fromkeys(TIER_NAMES, 0), "misses": 0, "computed": 0}
        r["hit_rate"] = sum(r["hits"].values()) / r["lookups"] if r["lookups"] else None
        out.append({"minute": m * 60, **r})
    return out


def classifier_names(registry, tenant: str) -> list[str]:
    """The tenant's classifier names, sorted, from the registry's folders alone (no manifest read).
    Adapter over ``Registry.root/<tenant>/<name>/``, the layout ``Registry.list`` walks; a folder
    caught mid-save or mid-delete may be listed and then answer 404 on its own page."""
    tdir = registry.root / tenant
    if not NAME_RE.match(tenant) or not tdir.is_dir():
        return []
    return sorted(e.name for e in tdir.iterdir() if NAME_RE.match(e.name) and e.is_dir())


def classifier_rows(service, tenant: str, names: Sequence[str], stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per name (a page of the listing): latest version, kind, labels, aliases, whether it
    is monitored, and its cache figures from ``stats`` (``GET /stats``' ``since_start.classifiers``).
    A classifier deleted meanwhile is left out."""
    reg = service.engine.registry
    watched = set(_monitored(service, tenant))
    per = stats["since_start"].get("classifiers", {})
    rows = []
    for name in names:
        try:
            aliases = reg.aliases(tenant, name)
            latest = reg.resolve(tenant, name)
        except NotFoundError:
            continue
        rows.append({"name": name, "latest": int(latest["version"]), "kind": latest.get("kind") or latest.get("type"),
                     "labels": list(latest.get("labels") or []), "aliases": aliases,
                     "monitored": name in watched, "cache": per.get(name)})
    return rows


def _monitored(service, tenant: str) -> list[str]:
    from headfleet.lifecycle.monitor import monitored

    return monitored(service.monitor.store, tenant)


def known_tenants(service) -> list[str]:
    """Every tenant the operator should see: those with a key, with cache figures, or with classifiers."""
    names = set(service.keys.tenants()) | set(service.engine.stats.tenants()) | set(service.engine.registry.tenants())
    return sorted(names)


def tenant_exists(service, tenant: str) -> bool:
    return tenant in known_tenants(service)


def fleet_view(service, per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``GET /admin/stats`` answers, plus per tenant its classifier count and key count, and the
    fleet's totals (sums over tenants of lookups, hits per tier, misses, computed, avoided). ``per``:
    tenant -> cache figures (``service.peers.every_tenant``)."""
    e = service.engine
    tenants = known_tenants(service)
    keys = service.keys.tenants()
    total = {"lookups": 0, "hits": dict.fromkeys(TIER_NAMES, 0), "misses": 0, "computed": 0,
             "embeddings_avoided": 0, "fanout_saved": 0}
    for snap in per.values():
        for k in ("lookups", "misses", "computed", "embeddings_avoided", "fanout_saved"):
            total[k] += snap[k]
        for tier, n in snap["hits"].items():
            total["hits"][tier] = total["hits"].get(tier, 0) + n
    total["hit_rate"] = sum(total["hits"].values()) / total["lookups"] if total["lookups"] else 0.0
    s = service.scheduler
    return {"tiers": {"bytes": e.cache.nbytes(), "errors": dict(e.cache.tier_errors)},
            "tenants": tenants, "stats": per, "keys": {t: len(keys.get(t, [])) for t in tenants},
            "total": total,
            "scheduler": {"batches": s.batches, "rejected": s.rejected, "dropped_requests": s.dropped_requests,
                          "dropped_texts": s.dropped_texts}}


def classifier_view(service, tenant: str, ref: str) -> dict[str, Any]:
    """A classifier's page: ``GET /classifiers/{ref}`` (manifest summary, versions, aliases with the
    candidate), ``GET /classifiers/{name}/monitor``, its shadow report (None without a shadow), and
    the tenant's experiments on it (newest first, each with ``GET /experiments/{id}``' figures).
    NotFoundError (404) for an unknown classifier or version, or another tenant's."""
    reg = service.engine.registry
    manifest = reg.resolve(tenant, ref)
    name = manifest["name"]
    monitor = service.monitor.report(tenant, name)
    shadow = None
    if service.shadows.config(tenant, name) is not None:
        try:
            shadow = service.shadows.report(tenant, name)
        except NotFoundError:  # stopped meanwhile
            shadow = None
    exps = [x for x in service.experiments.list(tenant, limit=500)["experiments"] if x["classifier"] == name]
    return {"manifest": manifest, "name": name, "versions": reg.versions(tenant, name),
            "aliases": reg.aliases(tenant, name), "monitor": monitor, "shadow": shadow,
            "experiments": [service.experiments.report(tenant, x["id"]) for x in exps[:20]],
            "holdout_accuracy": holdout_accuracy(reg.resolve(tenant, f"{name}@{monitor['version']}"))}


def holdout_accuracy(manifest: dict[str, Any]) -> float | None:
    """The accuracy the monitor's ``accuracy_drop`` floor is measured from, by the monitor's own rule
    (``lifecycle/profile.py``): ``metrics.accuracy``, else ``metrics.holdout_accuracy``."""
    metrics = manifest.get("metrics") or {}
    acc = metrics.get("accuracy")
    if acc is None:
        acc = metrics.get("holdout_accuracy")
    return None if acc is None else float(acc)


def experiments_view(service, tenant: str, limit: int = 20) -> list[dict[str, Any]]:
    """The tenant's newest ``limit`` experiments with each one's ``GET /experiments/{id}`` figures."""
    listing = service.experiments.list(tenant, limit=limit)["experiments"]
    out = []
    for x in listing:
        try:
            out.append(service.experiments.report(tenant, x["id"]))
        except NotFoundError:
            continue
    return out
