"""The in-process pipeline: normalise -> cache tiers -> backbone for misses -> head fan-out.

The CLI, the batch jobs and the HTTP scheduler all drive this one object. State is created
explicitly by :meth:`Engine.open` (backbone -> local store -> Redis) and torn down by
:meth:`Engine.close` in reverse, persisting the local store. Its concerns live in one file each
(``embedding``, ``lora_runtime``, ``resolution``, ``results``, ``training``), composed here.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from headfleet.cache import CacheStats, FaissStore, MemoryLRU, RedisTier, TieredCache
from headfleet.embedder import Embedder
from headfleet.errors import ValidationError
from headfleet.heads import HeadFleet, Registry
from headfleet.engine.types import ADAPTER_NS, Chooser, Route, Scored
from headfleet.settings import NEW_FOLDER_DEFAULT, Settings
from headfleet.text import blank_message, is_blank

from headfleet.engine.embedding import EmbeddingMixin, TruncationMemo
from headfleet.engine.lora_runtime import LoraRuntimeMixin
from headfleet.engine.resolution import ResolutionMixin
from headfleet.engine.results import ResultsMixin
from headfleet.engine.routing import RoutingMixin
from headfleet.engine.training import TrainingMixin

log = logging.getLogger(__name__)


class Engine(EmbeddingMixin, LoraRuntimeMixin, ResolutionMixin, RoutingMixin, ResultsMixin, TrainingMixin):
    """One backbone, its cache tiers, the registry and the fleet of loaded heads; thread-safe for
    concurrent requests (the fleet and the adapter manager are guarded by ``_lock``)."""

    def __init__(self, settings: Settings, embedder: Embedder, cache: TieredCache, registry: Registry,
                 stats: CacheStats, redis: RedisTier | None = None, local: FaissStore | None = None):
        self.settings = settings
        self.embedder = embedder
        self.cache = cache
        self.registry = registry
        self.stats = stats
        self.redis = redis
        self.local = local
        self.fleet = HeadFleet()
        self._resolved: dict[tuple[str, str], tuple[tuple, dict]] = {}
        self._registry_root = str(registry.root)
        self._alias_paths: dict[tuple[str, str], tuple[str, str]] = {}  # (tenant, name) -> its alias files
        self._lock = threading.Lock()
        self.adapters = None  # the AdapterManager, created at the first LoRA classifier (adapter_manager)
        self.adapter_load_hooks: list[Callable[[float], None]] = []  # seconds per cold adapter load (metrics)
        # observers (lifecycle subscribes here; the engine never imports it): every completed embedding
        # request -> (tenant, classifier names per group, batches); every classify request -> one
        # ``Scored`` (resolved versions, answer, source "classify"/"job", the vectors each group scored)
        self.embedded_hooks: list[Callable[[str, list, list], None]] = []
        self.scored_hooks: list[Callable[[Scored], None]] = []
        # lifecycle's version choosers (experiments, shadows: ``routing``), and observers of a live
        # request that failed after routing (tenant, route, exception): experiment guardrails
        self.choosers: list[Chooser] = []
        self.chooser_failures = 0
        self.failed_hooks: list[Callable[[str, Route, BaseException], None]] = []
        self.corrupt_hooks: list[Callable[[str], None]] = []  # "tenant/name@version" refused as corrupt (metrics)
        self.truncation = TruncationMemo()  # content key -> cut to max_length (a cache hit carries no flag)
        self._verified_adapters: set[str] = set()  # adapter ids whose file matched its sha256 at first use
        # Versions a request resolved stay loaded until it completes: resolve(pin=True) counts them
        # here, release() uncounts; an unload that finds a count > 0 retires the key instead, and the
        # last release removes it (a publish under live traffic never fails a request in flight).
        self._inflight: dict[str, int] = {}
        self._retired: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings | None = None, embedder: Embedder | None = None,
             stats: CacheStats | None = None) -> "Engine":
        """Bring up backbone -> local store -> Redis; ``embedder`` lets several engines share one backbone;
        ``stats``: the cache-hit figures to count on (a backbone reload keeps the service's)."""
        settings = settings or Settings.from_env()
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        embedder = embedder or Embedder.load(settings.model_path, max_length=settings.max_length,
                                             batch_size=settings.batch_size, device=settings.device,
                                             threads=settings.threads, backend=settings.backend,
                                             precision=settings.precision, cache_dir=settings.layout.onnx)
        fp = embedder.fingerprint
        if settings.backbone_source == NEW_FOLDER_DEFAULT:
            record_default_backbone(settings, embedder)
        tiers: list = [MemoryLRU(int(settings.memory_cache_mb * 2**20))]
        local = None
        if settings.faiss_store:
            local = FaissStore(embedder.dim, fp, settings.layout.local_store(fp),
                               flush_interval_s=settings.local_flush_s)
            tiers.append(local)
        redis = None
        if settings.redis_url:
            redis = RedisTier(settings.redis_url, embedder.dim, fp, ttl_s=settings.redis_ttl_s,
                              prefix=settings.redis_prefix)
            if not redis.ping():
                log.warning("Redis at %s is not answering; serving from the other tiers until it does",
                            settings.redis_url)
            tiers.append(redis)
        stats = stats if stats is not None else CacheStats()
        registry = Registry(settings.layout.registry, fingerprint=fp)
        swept = registry.sweep()
        if swept:
            log.info("removed %d leftover(s) of interrupted registry writes", swept)
        return cls(settings, embedder, TieredCache(tiers, stats), registry, stats, redis=redis, local=local)

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


    def classify(self, tenant: str, texts: Sequence[str], classifiers: Sequence[str], *,
                 namespace: str | None = None, progress: Callable[[int], None] | None = None,
                 unit: str | None = None, live: bool = True, debug: bool = False) -> dict:
        """Every text against every classifier in this thread: label, scores, version; per text its
        ``cache`` (:meth:`score_groups`); the cache report and ``timing_ms`` (adapter_load, cache, embed, heads).

        ``live``: the choosers (experiments, shadows) apply, with ``unit`` as the experiment unit;
        ``debug``: each shadowed entry carries its shadow's entry under ``"shadow"``."""
        t0 = time.perf_counter()
        if not texts:
            raise ValidationError("texts must hold at least one text")
        blank = next((i for i, t in enumerate(texts) if is_blank(t)), None)
        if blank is not None:
            raise ValidationError(blank_message(f"texts[{blank}]"))
        errors: dict[str, dict] = {}
        route = self.route(tenant, classifiers, errors, unit=unit, live=live)
        every = route.every
        try:
            groups = self.plan(tenant, every, namespace)
            if len(groups) == 1 and not groups[0][0].startswith(ADAPTER_NS):
                names = [m["name"] for _, _, m in every]
                batch = self.embed(tenant, texts, namespace=namespace, classifiers=names, progress=progress)
                out = self.score(batch, every)
                parts = [(batch, list(every))]
            else:
                batches = self.embed_groups(tenant, texts, [(ns, [m["name"] for _, _, m in items])
                                                            for ns, items in groups], progress=progress)
                parts = [(b, items) for b, (_, items) in zip(batches, groups)]
                out = self.score_groups(parts, every)
            scored = self.settle(tenant, route, out, parts, texts, "classify" if live else "job",
                                 ms=(time.perf_counter() - t0) * 1e3, debug=debug)
            self.observe_scores(scored)
        except BaseException as exc:
            self.observe_failure(tenant, route, exc)
            raise
        finally:
            self.release(every)
        if errors:
            out["errors"] = errors
        return out

    def observe_failure(self, tenant: str, route: Route, exc: BaseException) -> None:
        """Call every ``failed_hooks`` observer; one that raises is logged."""
        for hook in self.failed_hooks:
            try:
                hook(tenant, route, exc)
            except Exception:
                log.exception("failed hook %r failed", hook)

    def observe_scores(self, scored: Scored) -> None:
        """Call every ``scored_hooks`` observer with ``scored``; one that raises is logged and never
        fails the request. Observers run on the request's thread: they must only enqueue."""
        for hook in self.scored_hooks:
            try:
                hook(scored)
            except Exception:  # an observer's bug must not cost a tenant its answer
                log.exception("scored hook %r failed", hook)

    def tenant_stats(self, tenant: str, peers=()) -> dict:
        """``peers``: the tenant's raw figures from the other processes of a serving group."""
        return self.stats.snapshot(tenant, peers)

    def health(self) -> dict:
        """``ready``, or ``degraded`` with a reason that names no host, port or path (it is served
        without a key). Probes Redis (bounded, cached ~1 s: :meth:`RedisTier.probe`), so the answer
        is the present state even with no traffic; blocking: call it off the event loop."""
        if self.redis is not None and not self.redis.probe():
            return {"status": "degraded",
                    "reason": "redis unreachable: answering from the in-process tiers, new vectors are not shared"}
        return {"status": "ready"}


def record_default_backbone(settings: Settings, embedder: Embedder) -> None:
    """Write the backbone a new data folder was given by default into ``backbone.json`` (unless one
    is there already), so the folder keeps it once it holds classifiers; ``headfleet backbone
    plan``/``apply`` moves it like any other."""
    import time

    from headfleet.atomic import write_json_atomic

    path = settings.layout.backbone
    if path.exists():
        return
    write_json_atomic(path, {"model": settings.model_path, "backend": embedder.backend,
                             "precision": embedder.precision, "fingerprint": embedder.fingerprint,
                             "chosen": NEW_FOLDER_DEFAULT,
                             "applied": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "previous": None})
    log.info("new data folder %s: backbone %s %s recorded in %s", settings.data_dir, embedder.backend,
             embedder.precision, path)
