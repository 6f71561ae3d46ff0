"""Watch every classifier: the engine's scored hook in, windows, alerts and retrains out.

How monitoring costs no forward and (almost) nothing on the request path:

1. ``observe`` is a ``scored_hooks`` observer. It runs on the request's thread and only appends
   the ``Scored`` value (the answer and the vectors already computed) to a bounded queue when the
   request is live ``/classify`` traffic and names a monitored classifier; scoring jobs, training
   and canary scoring never count. A full queue drops the request's observation and counts it.
2. A background thread (``start``) drains the queue every ``interval_s``: per classifier version
   it adds the texts' predicted labels, confidences and embeddings to the open window in the
   state store, under the classifier's lock, so several replicas add up; it closes windows that
   are full (``window_texts``) or old (``window_seconds``) and computes their signals
   (``windows.close_window``) against the version's reference profile (``profile``), with the
   canary set rescored by the version (cached embeddings: a head operation).
3. A closed window raises ``drift`` / ``accuracy_drop`` alerts (kept, and POSTed to the webhook);
   when both hold for ``consecutive`` windows (``trigger``), a retraining job makes a candidate.

``drain()`` runs steps 2–3 synchronously; the report calls it first, so a reader sees every
request that completed before it asked.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from headfleet.engine import Compute, Engine, Scored
from headfleet.errors import NotFoundError
from headfleet.lifecycle import signals
from headfleet.lifecycle.feedback import FeedbackBook, check_items
from headfleet.lifecycle.probe import confidences as confidence_of, predictions, score_version
from headfleet.lifecycle.profile import Profile, build_profile
from headfleet.lifecycle.settings import MonitorSettings, merge_settings, settings_from_dict
from headfleet.lifecycle.trigger import TriggerMixin
from headfleet.lifecycle.webhook import WebhookSender
from headfleet.lifecycle.windows import Canary, OpenWindow, close_window

log = logging.getLogger(__name__)

QUEUE_MAX = 10_000  # requests waiting to be folded into windows
CLOSE_THREADS = min(2, os.cpu_count() or 1)  # windows of different classifiers closed at once
RESCAN_S = 60.0  # how often the store is scanned for open windows other replicas left


class Monitor(TriggerMixin):
    """Monitoring state of every tenant's classifiers, kept in ``store`` (a StateStore).

    ``compute_for(tenant) -> Compute | None``: how misses are embedded for profiles and canaries
    (the service: its scheduler, on the tenant's monitor lane); ``start_retrain(tenant, name, run,
    total) -> job dict``: runs ``run(embed, progress)`` as a job (the service: its job manager);
    without one, a retrain runs on a thread of its own. ``clock``: epoch seconds (tests move it).
    """

    def __init__(self, engine: Engine, store, *, compute_for: Callable[[str], Compute | None] | None = None,
                 start_retrain: Callable[..., dict] | None = None, clock: Callable[[], float] = time.time,
                 interval_s: float = 1.0, seed: int = 0):
        self.engine, self.store, self.clock, self.interval_s, self.seed = engine, store, clock, interval_s, seed
        self.book = FeedbackBook(store)
        self.compute_for = compute_for or (lambda tenant: None)
        self.start_retrain = start_retrain
        self.webhooks = WebhookSender()
        self.counts = collections.Counter()  # observations_dropped, windows_closed, alerts_<kind>, retrains
        self._drifting: dict[tuple[str, str], bool] = {}
        self._queue: collections.deque = collections.deque()
        self._enabled: dict[tuple[str, str], MonitorSettings] = {}
        self._enabled_at = 0.0
        self._profiles: dict[tuple[str, str, int], Profile | None] = {}
        self._open: dict[tuple[str, str, int], float] = {}  # open time windows this process knows: start
        self._rescanned = float("-inf")
        self._drain_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = np.random.default_rng(seed)

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self) -> "Monitor":
        self.engine.scored_hooks.append(self.observe)
        self._refresh_enabled(force=True)
        return self

    def start(self) -> "Monitor":
        self._thread = threading.Thread(target=self._loop, name="headfleet-monitor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.observe in self.engine.scored_hooks:
            self.engine.scored_hooks.remove(self.observe)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.drain()
            except Exception:  # a store outage or a bug: logged, retried next tick, never fatal
                log.exception("monitor tick failed")

    # -- the hook ----------------------------------------------------------------------------------
    def observe(self, scored: Scored) -> None:
        """``scored_hooks`` observer: O(classifiers) on the request thread, the rest later."""
        if scored.source != "classify" or not self._enabled:
            return
        tenant = scored.tenant
        if any((tenant, m["name"]) in self._enabled for _, _, m in scored.resolved):
            if len(self._queue) >= QUEUE_MAX:
                self.counts["observations_dropped"] += 1
                return
            self._queue.append((scored, self.clock()))

    # -- settings ----------------------------------------------------------------------------------
    def configure(self, tenant: str, name: str, patch: dict[str, Any]) -> dict:
        """Enable or change monitoring of ``name``; returns the full settings. 404 for an unknown
        classifier, 422 for a bad setting (nothing stored). Starts the reference profile of the
        version ``latest`` points at on a thread, so the first window need not wait for it."""
        manifest = self.engine.registry.resolve(tenant, name)
        name = manifest["name"]
        with self.store.lock(f"{tenant}/{name}"):
            current = self.settings(tenant, name) or MonitorSettings()
            merged = merge_settings(current, patch)
            self.store.put(f"{tenant}/{name}/settings", json.dumps(merged.to_dict()).encode())
        self._enabled[(tenant, name)] = merged
        threading.Thread(target=self._profile_quietly, args=(tenant, manifest), daemon=True).start()
        return merged.to_dict()

    def settings(self, tenant: str, name: str) -> MonitorSettings | None:
        raw = self.store.get(f"{tenant}/{name}/settings")
        return None if raw is None else settings_from_dict(json.loads(raw))

    def _refresh_enabled(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._enabled_at < 5.0:
            return
        enabled = {}
        for key in self.store.keys(""):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "settings":
                raw = self.store.get(key)
                if raw is not None:
                    enabled[(parts[0], parts[1])] = settings_from_dict(json.loads(raw))
        self._enabled, self._enabled_at = enabled, now

    # -- feedback and canary -------------------------------------------------------------------------
    def add_feedback(self, tenant: str, ref: str, items: list) -> int:
        """Labels for texts of ``ref`` (a ``@version`` suffix is ignored: feedback belongs to the
        classifier); 404 unknown classifier, 422 a label outside the live version's schema."""
        manifest = self.engine.registry.resolve(tenant, ref.partition("@")[0])
        checked = check_items(items, manifest["labels"], manifest["multi_label"])
        keep = (self.settings(tenant, manifest["name"]) or MonitorSettings()).feedback_max
        return self.book.add(tenant, manifest["name"], checked, keep)

    def set_canary(self, tenant: str, name: str, items: list) -> dict:
        manifest = self.engine.registry.resolve(tenant, name.partition("@")[0])
        checked = check_items(items, manifest["labels"], manifest["multi_label"], what="examples")
        out = self.book.set_canary(tenant, manifest["name"], checked, manifest["multi_label"])
        return {"classifier": manifest["name"], **out}

    def canary_info(self, tenant: str, name: str) -> dict:
        manifest = self.engine.registry.resolve(tenant, name.partition("@")[0])
        rolling = (self.settings(tenant, manifest["name"]) or MonitorSettings()).rolling_canary
        info = self.book.canary_info(tenant, manifest["name"], rolling)
        if info is None:
            raise NotFoundError(f"classifier {manifest['name']!r} has no canary set and no feedback yet")
        return {"classifier": manifest["name"], **info}

    def canary_scores(self, tenant: str, manifest: dict, settings: MonitorSettings) -> Canary:
        """The version ``manifest`` on the canary (core + rolling part): accuracy and macro-F1."""
        canary = self.book.canary(tenant, manifest["name"], settings.rolling_canary)
        if not canary.texts:
            return Canary(None, None, 0)
        probe = score_version(self.engine, tenant, manifest["id"], canary.texts, compute=self.compute_for(tenant))
        acc, f1 = signals.canary_scores(canary.labels, predictions(probe.probs, probe.labels, probe.multi_label),
                                        probe.labels)
        return Canary(round(acc, 6), round(f1, 6), len(canary.texts))

    # -- profiles ----------------------------------------------------------------------------------
    def profile(self, tenant: str, manifest: dict) -> Profile | None:
        """The version's reference profile: memory, then the store, else built (and stored) now."""
        key = (tenant, manifest["name"], int(manifest["version"]))
        if key in self._profiles:
            return self._profiles[key]
        skey = f"{tenant}/{manifest['name']}/v{manifest['version']}/profile"
        raw = self.store.get(skey)
        if raw is not None:
            prof: Profile | None = Profile.from_bytes(raw)
        else:
            size = (self.settings(tenant, manifest["name"]) or MonitorSettings()).reservoir
            prof = build_profile(self.engine, tenant, manifest, size=size, seed=self.seed,
                                 compute=self.compute_for(tenant))
            if prof is not None:
                self.store.put(skey, prof.to_bytes())
        self._profiles[key] = prof
        return prof

    def _profile_quietly(self, tenant: str, manifest: dict) -> None:
        try:
            self.profile(tenant, manifest)
        except Exception:
            log.exception("reference profile of %s/%s failed; retried at the first window", tenant, manifest["id"])

    # -- draining ------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Fold every queued observation into its window and close the windows that are due.

        The statistics run with one BLAS thread (``threadpoolctl``): on a busy CPU a multi-threaded
        BLAS makes these small matrix products ~15x slower and takes cores from the backbone."""
        from threadpoolctl import threadpool_limits

        with self._drain_lock, threadpool_limits(limits=1, user_api="blas"):
            self._refresh_enabled()
            batch = []
            while self._queue:
                batch.append(self._queue.popleft())
            groups: dict[tuple[str, str, int], dict] = {}
            for scored, at in batch:
                self._split(scored, at, groups)
            closes = []
            for (tenant, name, version), g in groups.items():
                closes += self._record(tenant, name, g["manifest"], g)
            self.close_windows(closes + self._close_due())

    def close_windows(self, closes: list[tuple]) -> None:
        """Close windows ``(tenant, name, manifest, settings, window, end)``: each classifier's in
        order, different classifiers on ``CLOSE_THREADS`` threads (the statistics run in BLAS,
        LAPACK and numpy, which release the GIL). One that fails is logged; the others close."""
        by_classifier: dict[tuple[str, str], list[tuple]] = {}
        for item in closes:
            by_classifier.setdefault((item[0], item[1]), []).append(item)

        def run(items: list[tuple]) -> None:
            for item in items:
                try:
                    self._close(*item)
                except Exception:
                    log.exception("closing a window of %s/%s failed", item[0], item[1])

        if len(by_classifier) < 2 or CLOSE_THREADS < 2:
            for items in by_classifier.values():
                run(items)
            return
        with ThreadPoolExecutor(CLOSE_THREADS, thread_name_prefix="headfleet-monitor-close") as pool:
            list(pool.map(run, by_classifier.values()))

    def _split(self, scored: Scored, at: float, groups: dict) -> None:
        for batch, items in scored.parts:
            for ref, _key, m in items:
                if (scored.tenant, m["name"]) not in self._enabled:
                    continue
                rows = [r["classifications"][ref] for r in scored.answer["results"]]
                probs = np.array([[r["scores"][lab] for lab in m["labels"]] for r in rows], dtype=np.float32)
                labels = [r["labels"] if m["multi_label"] else r["label"] for r in rows]
                g = groups.setdefault((scored.tenant, m["name"], int(m["version"])),
                                      {"manifest": m, "labels": [], "conf": [], "vecs": [], "at": at})
                g["labels"].extend(labels)
                g["conf"].append(confidence_of(probs, m["multi_label"]))
                g["vecs"].append(batch.vectors)

    def _record(self, tenant: str, name: str, manifest: dict, g: dict) -> list[tuple]:
        """Add a group's texts to the version's open window; returns the windows that filled up."""
        settings = self._enabled[(tenant, name)]
        labels, conf, vecs = g["labels"], np.concatenate(g["conf"]), np.concatenate(g["vecs"])
        prefix = f"{tenant}/{name}/v{manifest['version']}"
        closed: list[tuple[OpenWindow, float]] = []
        with self.store.lock(f"{tenant}/{name}"):
            raw = self.store.get(f"{prefix}/open")
            window = OpenWindow.from_bytes(raw) if raw else OpenWindow.new(g["at"], settings.reservoir, vecs.shape[1])
            if not settings.window_texts and window.texts and g["at"] - window.start >= settings.window_seconds:
                closed.append((window, g["at"]))  # its time was up before these texts came
                window = OpenWindow.new(g["at"], settings.reservoir, vecs.shape[1])
            i, n = 0, len(labels)
            while i < n:
                room = settings.window_texts - window.texts if settings.window_texts else n - i
                take = min(room, n - i)
                window.add(labels[i:i + take], conf[i:i + take], vecs[i:i + take], self._rng)
                i += take
                if settings.window_texts and window.texts >= settings.window_texts:
                    closed.append((window, self.clock()))
                    window = OpenWindow.new(self.clock(), settings.reservoir, vecs.shape[1])
            if window.texts:
                self.store.put(f"{prefix}/open", window.to_bytes())
                self._open[(tenant, name, int(manifest["version"]))] = window.start
            else:
                self.store.delete(f"{prefix}/open")
        return [(tenant, name, manifest, settings, w, end) for w, end in closed]

    def _close_due(self) -> list[tuple]:
        """Close time windows whose ``window_seconds`` are up. Each tick checks the windows this
        process wrote (no store scan); every ``RESCAN_S`` it scans the store for windows another
        replica opened and left (a replica that stopped). A window that gets traffic after its
        time is closed by that traffic's ``_record`` too."""
        now = self.clock()
        due: list[tuple] = []
        if now - self._rescanned >= RESCAN_S:
            self._rescanned = now
            for (tenant, name), settings in list(self._enabled.items()):
                for key in self.store.keys(f"{tenant}/{name}") if not settings.window_texts else ():
                    if key.endswith("/open"):
                        self._open.setdefault((tenant, name, int(key.split("/")[2][1:])), 0.0)
        for (tenant, name, version), start in list(self._open.items()):
            settings = self._enabled.get((tenant, name))
            if settings is None or settings.window_texts:
                self._open.pop((tenant, name, version), None)
                continue
            if now - start < settings.window_seconds:
                continue
            self._open.pop((tenant, name, version), None)
            key = f"{tenant}/{name}/v{version}/open"
            with self.store.lock(f"{tenant}/{name}"):
                raw = self.store.get(key)
                if raw is None:
                    continue
                window = OpenWindow.from_bytes(raw)
                if now - window.start < settings.window_seconds:
                    self._open[(tenant, name, version)] = window.start  # another replica restarted it
                    continue
                self.store.delete(key)
            try:
                manifest = self.engine.registry.resolve(tenant, f"{name}@{version}")
            except NotFoundError:
                continue
            due.append((tenant, name, manifest, settings, window, now))
        return due

    def _close(self, tenant: str, name: str, manifest: dict, settings: MonitorSettings, window: OpenWindow,
               end: float) -> None:
        profile = self.profile(tenant, manifest)
        canary = self.canary_scores(tenant, manifest, settings)
        report = close_window(window, end, profile, canary, settings, seed=self.seed)
        report["version"] = int(manifest["version"])
        key = f"{tenant}/{name}/v{manifest['version']}/windows"
        with self.store.lock(f"{tenant}/{name}"):
            windows = json.loads(self.store.get(key) or b"[]")
            windows.append(report)
            windows = windows[-settings.retention_windows:]
            self.store.put(key, json.dumps(windows).encode())
        with self._count_lock:
            self.counts["windows_closed"] += 1
        self._drifting[(tenant, name)] = report["drift"]
        self.after_close(tenant, name, manifest, settings, report, windows)

    # -- reading -----------------------------------------------------------------------------------
    def report(self, tenant: str, name: str) -> dict:
        """:func:`read_report` after :meth:`drain` (every completed request is in the windows)."""
        self.engine.registry.resolve(tenant, name.partition("@")[0])  # 404 before any work
        self.drain()
        return read_report(self.engine.registry, self.store, tenant, name)

    def summary(self) -> dict[str, int]:
        """Bounded-cardinality figures for /metrics (no series per classifier)."""
        return {"monitored": len(self._enabled), "drifting": sum(self._drifting.values()),
                "retrains": self.counts["retrains"], "windows_closed": self.counts["windows_closed"],
                "observations_dropped": self.counts["observations_dropped"],
                "webhook_failures": self.webhooks.failures}

    def forget(self, tenant: str, name: str | None = None) -> int:
        """Delete every monitoring record of one classifier (or of the whole tenant)."""
        prefix = tenant if name is None else f"{tenant}/{name}"
        n = self.store.delete_prefix(prefix)
        for key in [k for k in self._enabled if k[0] == tenant and (name is None or k[1] == name)]:
            self._enabled.pop(key, None)
            self._drifting.pop(key, None)
        self._profiles = {k: v for k, v in self._profiles.items()
                          if not (k[0] == tenant and (name is None or k[1] == name))}
        return n


def read_report(registry, store, tenant: str, name: str) -> dict:
    """``{"classifier", "version", "enabled", "settings", "windows", "alerts", "retrain"}`` as stored:
    the closed windows of the version ``latest`` points at, oldest first; alerts oldest first.
    Reads only (the CLI uses it without a backbone); NotFoundError (404) for an unknown classifier."""
    from headfleet.lifecycle.trigger import NO_RETRAIN

    manifest = registry.resolve(tenant, name.partition("@")[0])
    name = manifest["name"]
    raw = store.get(f"{tenant}/{name}/settings")
    settings = None if raw is None else settings_from_dict(json.loads(raw))
    windows = json.loads(store.get(f"{tenant}/{name}/v{manifest['version']}/windows") or b"[]")
    retrain = store.get(f"{tenant}/{name}/retrain")
    return {"classifier": name, "version": int(manifest["version"]), "enabled": settings is not None,
            "settings": (settings or MonitorSettings()).to_dict(), "windows": windows,
            "alerts": json.loads(store.get(f"{tenant}/{name}/alerts") or b"[]"),
            "retrain": json.loads(retrain) if retrain is not None else dict(NO_RETRAIN)}


def monitored(store, tenant: str) -> list[str]:
    """Names of the tenant's classifiers with monitoring enabled, sorted."""
    return sorted(k.split("/")[1] for k in store.keys(tenant) if k.count("/") == 2 and k.endswith("/settings"))
