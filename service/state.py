"""Everything one running service holds, created in the app's lifespan and torn down in reverse.

Order up: backbone -> local store -> Redis (``Engine.open``), then the scheduler, then the
training-job workers, then the monitor (its state store, its drain thread), experiments and shadows
(their stores, their threads). Down: shadows, experiments, monitor, jobs, scheduler (its Redis write-back queue is flushed), engine
(the local store is saved).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

from headfleet.errors import TooLargeError, ValidationError
from headfleet.service.auth import KeyStore
from headfleet.engine import EmbedBatch, Engine
from headfleet.lifecycle.experiments import Experiments
from headfleet.lifecycle.monitor import Monitor
from headfleet.lifecycle.settings import MonitorSettings
from headfleet.lifecycle.shadow import Shadows
from headfleet.lifecycle.store import open_store
from headfleet.service.jobs import JobManager
from headfleet.service.metrics import ExperimentsCollector, Metrics, MonitorCollector
from headfleet.service.namespaces import NamespaceStore
from headfleet.service.scheduler import Scheduler
from headfleet.service.scoring_jobs import ScoringJobs, scheduler_classify
from headfleet.settings import Settings
from headfleet.text import blank_message, is_blank

log = logging.getLogger("headfleet.service")

HEADS_INLINE_CELLS = 4096  # texts x classifiers scored on the event loop; above this, in a thread


def batch_tokens(settings: Settings, engine: Engine) -> int:
    """The scheduler's token budget per batch. On a CPU a forward costs about the same per text from
    4 texts up (measured: 100 texts/s at batch 4 and 8, 84 at batch 64 on SMS), while a big batch
    makes every other tenant wait for it; so CPU batches stay small. A GPU gains from big ones."""
    if settings.batch_tokens is not None:
        return settings.batch_tokens
    return 16384 if str(engine.embedder.device).startswith("cuda") else 256


def _examples_once(engine: Engine, settings: Settings) -> None:
    """Train the example classifiers unless they exist, under an flock on the data folder, so
    replicas starting together on one folder train them once (the others find them)."""
    from headfleet.atomic import locked
    from headfleet.engine.examples import ensure_examples

    with locked(Path(settings.data_dir) / ".examples.lock"):
        ensure_examples(engine, "default", log.info)


def yield_tokens(settings: Settings, engine: Engine) -> int | None:
    """Pieces a CPU batch's forward is cut into (``Scheduler(yield_tokens=)``): a quarter of a batch
    (64 tokens by default, two or three SMS), so another tenant's text waits for at most that piece
    of a flood's batch and then has the cores to itself; on this CPU a forward costs about the same
    per token from a few texts up. None on a GPU, where a forward is short and big batches pay."""
    if str(engine.embedder.device).startswith("cuda"):
        return None
    return max(1, batch_tokens(settings, engine) // 4)


@dataclasses.dataclass
class Service:
    settings: Settings
    engine: Engine
    scheduler: Scheduler
    jobs: JobManager
    keys: KeyStore
    metrics: Metrics
    scoring: ScoringJobs | None = None
    namespaces: NamespaceStore | None = None
    monitor: Monitor | None = None
    experiments: Experiments | None = None
    shadows: Shadows | None = None
    started: float = dataclasses.field(default_factory=time.time)

    @classmethod
    async def start(cls, settings: Settings, embedder=None, stats=None) -> "Service":
        """``stats``: the cache-hit figures to count on (a backbone reload passes the old service's)."""
        keys = KeyStore(settings.layout.keys, settings.api_keys,
                        settings.admin_key)
        engine = await asyncio.to_thread(Engine.open, settings, embedder, stats)
        metrics = Metrics(redis=engine.redis)
        engine.corrupt_hooks.append(lambda _key: metrics.corrupt_versions.inc())
        engine.adapter_load_hooks.append(metrics.adapter_load.observe)
        # what LoRA rows run through, loaded before traffic (after the hooks above: the adapter manager
        # copies them when it is made); otherwise the first LoRA request loads it while resolving, on
        # the event loop, and every tenant waits (seconds on ONNX Runtime)
        await asyncio.to_thread(engine.warm_lora)
        scheduler = Scheduler(engine.fill, engine.write_back, max_length=engine.embedder.max_length,
                              batch_texts=settings.batch_size, batch_tokens=batch_tokens(settings, engine),
                              yield_tokens=yield_tokens(settings, engine),
                              tenant_queue_texts=settings.tenant_queue_texts, queue_texts=settings.queue_texts,
                              metrics=metrics.scheduler_hooks())
        await scheduler.start()
        jobs = JobManager(engine, scheduler, settings.layout.jobs, settings.jobs_workers)
        service = cls(settings, engine, scheduler, jobs, keys, metrics,
                      namespaces=NamespaceStore(settings.layout.namespaces))
        service.monitor = Monitor(engine, open_store(settings),
                                  compute_for=lambda tenant: jobs.compute(tenant, f"{tenant}#monitor"),
                                  start_retrain=lambda tenant, name, run, total: jobs.submit_run(
                                      tenant, name, run, total, kind="retrain"),
                                  interval_s=settings.monitor_interval_s).attach().start()
        jobs.canary_hash = lambda tenant, name: service.monitor.book.scored_hash(  # as a monitor candidate names it
            tenant, name, (service.monitor.settings(tenant, name) or MonitorSettings()).rolling_canary)
        metrics.register(MonitorCollector(service.monitor))
        # choosers run in this order: an experiment picks the arm, then the shadow joins it
        service.experiments = Experiments(engine, open_store(settings, "experiments")).attach().start()
        service.shadows = Shadows(engine, service.monitor.store, service.monitor.book).attach().start()
        metrics.register(ExperimentsCollector(service.experiments, service.shadows, engine))
        service.scoring = ScoringJobs(engine, scheduler_classify(service, asyncio.get_running_loop()),
                                      settings.scoring_root, settings.layout.jobs,
                                      batch_size=settings.batch_size)
        if keys.single_tenant:
            log.warning("no API keys configured: single-tenant mode, every request is tenant 'default'; "
                        "configure HEADFLEET_API_KEYS or HEADFLEET_ADMIN_KEY before exposing the service")
            if settings.examples:
                await asyncio.to_thread(_examples_once, engine, settings)
        return service

    async def stop(self) -> None:
        await asyncio.to_thread(self.shadows.close)
        await asyncio.to_thread(self.experiments.close)
        await asyncio.to_thread(self.monitor.close)
        self.jobs.close()
        self.scoring.close()  # jobs stop between chunks and resume at the next start
        await self.scheduler.stop()
        await asyncio.to_thread(self.scoring.join)
        await asyncio.to_thread(self.engine.close)

    # -- the request path ------------------------------------------------------------------------
    def check_texts(self, texts: Sequence[str], field: str = "texts") -> None:
        s = self.settings
        if not texts:
            raise ValidationError(f"{field} must hold at least one text", param=field)
        if len(texts) > s.max_texts_per_request:
            raise TooLargeError(f"{len(texts)} texts in one request; the limit is {s.max_texts_per_request} "
                                f"(HEADFLEET_MAX_TEXTS_PER_REQUEST) — split the request or use a batch job", param=field)
        for i, t in enumerate(texts):
            if len(t) > s.max_chars_per_text:
                raise TooLargeError(f"{field}[{i}] has {len(t)} characters; the limit is {s.max_chars_per_text} "
                                    "(HEADFLEET_MAX_CHARS_PER_TEXT)", param=field)
            if is_blank(t):
                raise ValidationError(blank_message(f"{field}[{i}]"), param=field)

    def check_namespace(self, tenant: str, namespace: str | None) -> None:
        """A shared cache namespace must be granted to ``tenant`` (403 otherwise); single-tenant mode
        has one tenant, so every namespace is its own."""
        if namespace is not None and not self.keys.single_tenant:
            self.namespaces.check(tenant, namespace)

    def check_classifiers(self, classifiers: Sequence[str]) -> None:
        limit = self.settings.max_classifiers_per_request
        if len(classifiers) > limit:
            raise TooLargeError(f"{len(classifiers)} classifiers in one request; the limit is {limit} "
                                "(HEADFLEET_MAX_CLASSIFIERS_PER_REQUEST)")

    async def embed(self, tenant: str, texts: Sequence[str], *, namespace: str | None = None,
                    classifiers: Sequence[str] = (), receive=None, lane: str | None = None,
                    admit: bool = True) -> EmbedBatch:
        """Vectors for ``texts`` in the tenant's (or a granted shared) namespace: :meth:`embed_groups`
        with one group."""
        self.check_namespace(tenant, namespace)
        ns = self.engine.namespace_for(tenant, namespace)
        return (await self.embed_groups(tenant, texts, [(ns, classifiers)], receive=receive, lane=lane,
                                        admit=admit))[0]

    async def embed_groups(self, tenant: str, texts: Sequence[str], groups: Sequence[tuple[str, Sequence[str]]], *,
                           receive=None, lane: str | None = None, admit: bool = True) -> list[EmbedBatch]:
        """The engine's request driver with the scheduler as its compute step: in-process tiers
        inline (:meth:`Engine.begin`), the distinct misses of every group through the scheduler
        together (so adapter rows ride in the same backbone batches as plain rows), then
        :meth:`Engine.complete`; cache metrics recorded once per group."""
        request = self.engine.begin(tenant, texts, groups)
        answers: dict = {}
        extra = {"queue": 0.0, "embed": 0.0}
        if request.keys:
            answers, extra = await self.scheduler.run(tenant, request.keys, request.texts, request.namespaces,
                                                      disconnected=receive, lane=lane, admit=admit)
        batches = self.engine.complete(request, answers, extra)
        for batch in batches:
            self.metrics.cache(batch.tiers, batch.computed)
        return batches

    async def classify(self, tenant: str, texts: Sequence[str], classifiers: Sequence[str], *,
                       namespace: str | None = None, receive=None, lane: str | None = None, admit: bool = True,
                       check: bool = True, unit: str | None = None, debug: bool = False) -> dict:
        """``lane``/``admit``/``check=False``: a scoring job's chunk (its own lane, no per-request limits,
        no experiments or shadows). Live requests go through the engine's choosers (``unit``: the
        experiment unit; ``debug``: shadow entries shown)."""
        t0 = time.perf_counter()
        if check:
            self.check_texts(texts)
        self.check_classifiers(classifiers)
        self.check_namespace(tenant, namespace)
        errors: dict[str, dict] = {}
        live = lane is None
        route = self.engine.route(tenant, classifiers, errors, unit=unit, live=live)  # held until scored
        every = route.every
        try:
            groups = self.engine.plan(tenant, every, namespace)
            batches = await self.embed_groups(tenant, texts, [(ns, [m["name"] for _, _, m in items])
                                                              for ns, items in groups],
                                              receive=receive, lane=lane, admit=admit)
            parts = [(b, items) for b, (_, items) in zip(batches, groups)]
            if len(texts) * len(every) > HEADS_INLINE_CELLS:
                out = await asyncio.to_thread(self.engine.score_groups, parts, every)
            else:
                out = self.engine.score_groups(parts, every)
            scored = self.engine.settle(tenant, route, out, parts, texts, "classify" if live else "job",
                                        ms=(time.perf_counter() - t0) * 1e3, debug=debug)
            self.engine.observe_scores(scored)
        except BaseException as exc:
            self.engine.observe_failure(tenant, route, exc)
            raise
        finally:
            self.engine.release(every)
        self.metrics.heads.observe(out["timing_ms"]["heads"] / 1e3)
        out["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 3)
        if errors:
            out["errors"] = errors
        return out
