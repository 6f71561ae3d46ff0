"""Prometheus metrics of one app instance (its own registry, so two apps in a process never mix).

Under ``serve --workers N`` the workers share one series set: the parent sets
``PROMETHEUS_MULTIPROC_DIR`` and prometheus_client's multiprocess mode keeps every worker's values
in files there, which a scrape of any worker adds up (gauges: the live workers' sum, or max where
a sum would mislead).

No metric carries a tenant label: ``/metrics`` is an operator's view and is served to the
admin key only when keys are configured; per-tenant figures are in ``/stats``, each tenant
seeing its own.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from headfleet.names import MISS, TIER_NAMES
from headfleet.service.scheduler import SchedulerMetrics

_MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
ENDPOINTS = ("/classify", "/embed", "/v1/embeddings", "/v1/models", "/classifiers", "/feedback", "/stats", "/health",
             "/info", "/metrics")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, redis=None) -> None:
        """``redis``: the Redis tier when one is configured (only then are ``headfleet_redis_up`` and
        ``headfleet_redis_outages_total`` exported, read from the tier at each scrape)."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._custom: list[Any] = []  # collectors read at scrape time, in this process
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.request = Histogram("headfleet_request_seconds", "Request latency by endpoint and status class",
                                 ["endpoint", "status"], buckets=_MS_BUCKETS, registry=r)
        self.queue = Histogram("headfleet_queue_seconds", "Time a request's misses waited for their first batch",
                               buckets=_MS_BUCKETS, registry=r)
        self.embed = Histogram("headfleet_embed_seconds", "Backbone batch time (Redis lookup + forward)",
                               buckets=_MS_BUCKETS, registry=r)
        self.heads = Histogram("headfleet_heads_seconds", "Head fan-out time per request", buckets=_MS_BUCKETS,
                               registry=r)
        self.batch_texts = Histogram("headfleet_batch_texts", "Distinct texts per backbone batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("headfleet_batch_tokens", "Estimated tokens per backbone batch",
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384), registry=r)
        self.cache_lookups = Counter("headfleet_cache_lookups_total", "Texts looked up in the cache, by answer",
                                     ["tier"], registry=r)
        self.computed = Counter("headfleet_embeddings_computed_total", "Embeddings the backbone computed", registry=r)
        self.rejected = Counter("headfleet_rejected_total", "Requests refused by admission control (429)", ["scope"],
                                registry=r)
        self.dropped = Counter("headfleet_dropped_texts_total", "Queued texts dropped because their client went away",
                               registry=r)
        self.failures = Counter("headfleet_failures_total", "Failed requests by error type", ["error_type"],
                                registry=r)
        self.queue_depth = Gauge("headfleet_queue_texts", "Texts waiting for the backbone", registry=r,
                                 multiprocess_mode="livesum")
        self.heads_loaded = Gauge("headfleet_heads_loaded", "Classifier versions loaded in the fleet", registry=r,
                                  multiprocess_mode="livemax")
        self.adapter_load = Histogram("headfleet_adapter_load_seconds", "LoRA adapter cold load: disk -> host -> "
                                      "device slot", buckets=_MS_BUCKETS, registry=r)
        self.adapters = Gauge("headfleet_adapters", "LoRA adapters: device slots in use, slots, loaded in host memory",
                              ["state"], registry=r, multiprocess_mode="livesum")
        self.adapter_events = Gauge("headfleet_adapter_events", "LoRA adapter manager counters since start "
                                    "(disk_loads, slot_loads, slot_hits, slot_evictions, host_evictions)", ["event"],
                                    registry=r, multiprocess_mode="livesum")
        if redis is not None:
            self.register(_RedisCollector(redis))
        self.corrupt_versions = Counter("headfleet_corrupt_versions", "Classifier versions refused at load because "
                                        "their files did not match the manifest's sha256 or could not be read",
                                        registry=r)
        # labelled children, looked up once (``labels()`` costs as much as the observation itself)
        self._lookup_children = {tier: self.cache_lookups.labels(tier) for tier in (*TIER_NAMES, MISS)}
        self._request_children: dict[tuple[str, str], Any] = {}  # bounded: _endpoint() x status class
        for scope in ("tenant", "global"):
            self.rejected.labels(scope)

    def register(self, collector) -> None:
        """A collector read at scrape time (monitor, experiments, Redis): state shared through the
        data folder or Redis, so the answering worker's reading is the group's."""
        self._custom.append(collector)
        self.registry.register(collector)

    def scheduler_hooks(self) -> SchedulerMetrics:
        def batch(texts: int, tokens: int, seconds: float) -> None:
            self.batch_texts.observe(texts)
            self.batch_tokens.observe(tokens)
            self.embed.observe(seconds)

        return SchedulerMetrics(
            batch=batch,
            queued=self.queue.observe,
            rejected=lambda scope: self.rejected.labels(scope).inc(),
            dropped=self.dropped.inc,
        )

    def observe_request(self, endpoint: str, status: str, seconds: float) -> None:
        """One HTTP request's latency; the labelled child is looked up once per (endpoint, status)."""
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self._request_children[(endpoint, status)] = self.request.labels(endpoint, status)
        child.observe(seconds)

    def cache(self, tiers: list[str | None], computed: int) -> None:
        counts: dict[str, int] = {}
        for t in tiers:
            counts[t or MISS] = counts.get(t or MISS, 0) + 1
        for t, n in counts.items():
            child = self._lookup_children.get(t)
            (child if child is not None else self.cache_lookups.labels(t)).inc(n)
        if computed:
            self.computed.inc(computed)

    def local_counters(self) -> dict[str, float]:
        """The counters of the scrape-time collectors (monitor, experiments, Redis) as this process
        counts them, name -> value: what a worker publishes in its heartbeat for the others' scrapes."""
        out: dict[str, float] = {}
        for collector in self._custom:
            for family in collector.collect():
                if family.type == "counter":
                    out[family.name] = sum(x.value for x in family.samples if x.name.endswith("_total"))
        return out

    def render(self, peer_counters: list[dict[str, float]] = ()) -> bytes:
        """The exposition text. Under ``serve --workers`` (multiprocess mode): every worker's series
        from the multiprocess files, and the scrape-time collectors' counters summed with
        ``peer_counters`` (the other workers' :meth:`local_counters`, dead ones included, so a sum
        never goes back); their gauges are the answering worker's reading of shared state."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_Summed(self._custom, peer_counters))
        return generate_latest(registry)

    @staticmethod
    def process_exited(pid: int | None = None) -> None:
        """A worker (this one by default) stopped or died: its live gauges leave the multiprocess
        sums (counters stay). The parent of ``serve --workers`` calls it for a worker that died."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid())


class _Summed:
    """The scrape-time collectors with each counter family's value summed over the workers."""

    def __init__(self, collectors: list[Any], peer_counters: list[dict[str, float]]) -> None:
        self.collectors, self.peer_counters = collectors, peer_counters

    def describe(self):
        return []

    def collect(self):
        for collector in self.collectors:
            for family in collector.collect():
                if family.type != "counter":
                    yield family
                    continue
                own = sum(x.value for x in family.samples if x.name.endswith("_total"))
                total = own + sum(float(p.get(family.name, 0.0)) for p in self.peer_counters)
                yield CounterMetricFamily(family.name, family.documentation, value=total)


def refresh_gauges(service) -> None:
    """Set the gauges read from the service's state (heads loaded, queue depth, adapter slots). Called
    at each scrape, and under ``serve --workers`` at each heartbeat, so the multiprocess sums hold
    every worker's present values rather than those of its last scrape. Safe off the event loop."""
    m, e = service.metrics, service.engine
    m.heads_loaded.set(len(e.fleet))
    m.queue_depth.set(service.scheduler.waiting)
    if e.adapters is not None:
        snap = e.adapters.snapshot()
        m.adapters.labels("slots").set(snap["slots"])
        m.adapters.labels("slots_used").set(snap["slots_used"])
        m.adapters.labels("loaded").set(snap["loaded"])
        for event in ("disk_loads", "slot_loads", "slot_hits", "slot_evictions", "host_evictions"):
            m.adapter_events.labels(event).set(snap[event])


class _RedisCollector:
    """The Redis tier's health as the tier itself counts it, read at scrape time (no copy to keep)."""

    def __init__(self, tier) -> None:
        self.tier = tier

    def describe(self):
        return []

    def collect(self):
        status = self.tier.status()
        yield GaugeMetricFamily("headfleet_redis_up", "1 when the Redis tier answers (probed at most once a "
                                "second), 0 when it does not", value=1 if status["healthy"] else 0)
        yield CounterMetricFamily("headfleet_redis_outages", "Times the Redis tier went from answering to not "
                                  "answering", value=status["outages"])


class MonitorCollector:
    """The monitor's fleet-wide figures, read at scrape time: counts, never a series per classifier
    (a thousand tenants' classifiers must not become a thousand label values)."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor

    def describe(self):
        return []

    def collect(self):
        s = self.monitor.summary()
        yield GaugeMetricFamily("headfleet_monitor_classifiers", "Classifiers with monitoring enabled",
                                value=s["monitored"])
        yield GaugeMetricFamily("headfleet_monitor_drifting_classifiers", "Monitored classifiers whose last "
                                "closed window (in this process) had drift", value=s["drifting"])
        yield CounterMetricFamily("headfleet_monitor_retrains", "Retraining jobs the monitor started",
                                  value=s["retrains"])
        yield CounterMetricFamily("headfleet_monitor_windows_closed", "Monitor windows closed", value=s["windows_closed"])
        yield CounterMetricFamily("headfleet_monitor_observations_dropped", "Classify requests left out of the "
                                  "windows because the monitor's queue was full", value=s["observations_dropped"])
        yield CounterMetricFamily("headfleet_monitor_webhook_failures", "Alert webhooks given up after every "
                                  "retry, or dropped on a full queue", value=s["webhook_failures"])


class ExperimentsCollector:
    """Shadows and experiments, fleet-wide (no series per experiment or classifier)."""

    def __init__(self, experiments, shadows, engine) -> None:
        self.experiments, self.shadows, self.engine = experiments, shadows, engine

    def describe(self):
        return []

    def collect(self):
        e, s = self.experiments.summary(), self.shadows.summary()
        yield GaugeMetricFamily("headfleet_experiments_running", "A/B experiments running (as this replica last "
                                "read them)", value=e["running"])
        yield CounterMetricFamily("headfleet_experiments_auto_stops", "Experiments this replica stopped and rolled "
                                  "back because the treatment breached a guardrail",
                                  value=e["auto_stops"])
        yield CounterMetricFamily("headfleet_experiments_exposures_dropped", "Experiment exposures left out "
                                  "because the queue was full", value=e["exposures_dropped"])
        yield GaugeMetricFamily("headfleet_shadows_active", "Classifiers with a shadow version",
                                value=s["active"])
        yield CounterMetricFamily("headfleet_shadows_observations_dropped", "Shadowed requests left out of the "
                                  "shadow counts because the queue was full",
                                  value=s["observations_dropped"])
        yield CounterMetricFamily("headfleet_chooser_failures", "Live requests served as asked because an "
                                  "experiment or shadow chooser failed", value=self.engine.chooser_failures)
