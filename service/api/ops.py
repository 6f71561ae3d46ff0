"""Operations: the cache-hit report, Prometheus metrics, health, service info."""

from __future__ import annotations

import asyncio

from litestar.di import NamedDependency
from litestar import Controller, MediaType, Request, Response, get

from headfleet import __version__
from headfleet.service.api.deps import metrics_guard
from headfleet.service.api.embeddings import backbone_name
from headfleet.service.auth import key_from_headers
from headfleet.service.metrics import refresh_gauges
from headfleet.service.peers import read_group, stats_report
from headfleet.service.state import Service


class OpsController(Controller):
    tags = ["operations"]

    @get("/stats", summary="Cache-hit report for the calling tenant")
    async def stats(self, request: Request, service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        """Hit rate per tier, per classifier, embeddings computed and avoided, since start and over the
        last minute / 5 minutes / hour; entries and bytes this tenant's namespace holds per tier.
        Only the caller's own figures: another tenant's traffic never shows here.

        Under ``serve --workers`` (or Ray replicas) the figures are every process's of this run, each
        other process's at most a quarter of a second old (``service.peers``); ``processes`` counts those that
        reported; ``held.memory`` is the answering process's own memory tier."""
        return stats_report(service, tenant, await read_group(getattr(request.app.state, "peers", None), tenant))

    @get("/metrics", summary="Prometheus metrics (admin key when keys are configured)", media_type=MediaType.TEXT,
         guards=[metrics_guard])
    async def metrics(self, request: Request, service: NamedDependency[Service]) -> Response:
        """Under ``serve --workers``: every worker's series (see ``service.metrics``)."""
        if service.engine.redis is not None:
            await asyncio.to_thread(service.engine.redis.probe)
        refresh_gauges(service)
        peers = getattr(request.app.state, "peers", None)
        counters = [b.get("counters") or {} for b in await asyncio.to_thread(peers.members)] \
            if peers is not None and service.metrics.multiprocess else []
        # Litestar appends "; charset=utf-8" to text/* itself: give the type without it
        body = await asyncio.to_thread(service.metrics.render, counters) if service.metrics.multiprocess \
            else service.metrics.render()
        return Response(body, media_type=service.metrics.content_type.split("; charset")[0])

    @get("/health", summary="ready, or degraded with the reason")
    async def health(self, service: NamedDependency[Service]) -> dict:
        """Served without a key: the reason names no host, port or path. Redis is probed (bounded,
        cached about a second), so the answer is right within seconds with no traffic."""
        out = await asyncio.to_thread(service.engine.health)
        refresh_gauges(service)
        out["queue_texts"] = service.scheduler.waiting
        return out

    @get("/info", summary="Backbone, fingerprint, limits, version")
    async def info(self, request: Request, service: NamedDependency[Service]) -> dict:
        """Served without a key. With keys configured, the backbone's folder (a server path) is shown
        to the admin key only."""
        e, s = service.engine.embedder, service.settings
        backbone = {"name": backbone_name(str(e.folder))}
        if service.keys.single_tenant or service.keys.is_admin(key_from_headers(request.headers)):
            backbone["folder"] = str(e.folder)
        return {
            "name": "headfleet",
            "version": __version__,
            "backbone": {**backbone, "fingerprint": e.fingerprint, "dim": e.dim,
                         "max_length": e.max_length, "device": str(e.device),
                         "backend": getattr(e, "backend", "torch"), "precision": getattr(e, "precision", "fp32"),
                         "normalize": bool(e.pooling.normalize), "source": s.backbone_source},
            "tenancy": "single" if service.keys.single_tenant else "multi",
            "cache_tiers": service.engine.cache.tier_names,
            "limits": {"max_texts_per_request": s.max_texts_per_request,
                       "max_classifiers_per_request": s.max_classifiers_per_request,
                       "max_chars_per_text": s.max_chars_per_text, "max_body_bytes": s.max_body_bytes,
                       "tenant_queue_texts": s.tenant_queue_texts, "queue_texts": s.queue_texts,
                       "batch_texts": s.batch_size, "batch_tokens": service.scheduler.batch_tokens},
        }


