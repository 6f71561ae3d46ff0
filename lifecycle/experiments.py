"""A/B experiments between two versions of a classifier: sticky assignment, outcomes, statistics,
guardrails, promotion and rollback.

How each guarantee is kept:

- **Sticky, replica-independent assignment.** A request that names the bare classifier (or
  ``@latest``) of a running experiment and carries a unit gets the arm ``assign(id, unit, split)``:
  a hash of (experiment id, unit), so every replica and every restart gives the same unit the same
  arm with no shared state on the request path. A request without a unit gets control and counts
  toward nothing; a request pinned to a version or another alias bypasses the experiment.
- **Nothing on the request path but memory.** The chooser reads the running experiments from
  memory (refreshed from the store's ``running`` document every ``refresh_s``, so an experiment
  created on another replica is seen within that); exposures and guardrail counts are queued and
  folded into the store by a background thread every ``interval_s``.
- **Replicas add up.** Exposed units go into one document per experiment under its lock (a
  set: idempotent); each replica keeps its own guardrail counters document and readers sum them;
  outcomes are read-modified-written under the experiment's lock, and an item's ``id`` makes a
  retried post harmless.
- **Pre-registered.** The configuration is fixed at creation (control and treatment pinned to
  versions); there is no way to change it. Stopping moves ``latest`` (one atomic alias write) and
  freezes the full result into the record.

Store layout (a StateStore of its own, space ``experiments``): ``running`` (every tenant's running
experiments, by classifier), ``<tenant>/<id>/config``, ``.../units``, ``.../outcomes``,
``.../guard/<replica>``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Callable


from headfleet.engine import Choice, Engine, Route, Scored
from headfleet.errors import (Cancelled, ClientGoneError, ConflictError, NotFoundError, OverloadedError,
                              ValidationError)
from headfleet.heads.refs import LATEST
from headfleet.lifecycle import experiment_stats, guardrails
from headfleet.lifecycle.experiment_config import check_config
from headfleet.lifecycle.experiment_outcomes import check_item, slices, unit_values
from headfleet.lifecycle.windows import iso
from headfleet.lifecycle.worker import StoreWorker

log = logging.getLogger(__name__)

RUNNING = "running"
ARMS = ("control", "treatment")
QUEUE_MAX = 100_000
MAX_ITEMS = 10_000  # outcome items per post
MAX_LOOKS = 500  # looks kept per experiment; beyond, every other older look is thinned out
GUARD_CHECK_S = 2.0  # how often the background thread judges an experiment's guardrails
_NOT_THE_ARMS_FAULT = (ValidationError, NotFoundError, OverloadedError, ClientGoneError, Cancelled)


def assign(exp_id: str, unit: str, split: float) -> str:
    """``"treatment"`` when the first 8 bytes of blake2b(id, unit) read as a fraction of 2^64 fall
    below ``split``, else ``"control"``: uniform, independent across experiments, deterministic."""
    h = hashlib.blake2b(f"{exp_id}\x00{unit}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "treatment" if int.from_bytes(h, "big") / 2.0**64 < split else "control"


def _replica_name() -> str:
    host = re.sub(r"[^a-z0-9_.-]", "-", socket.gethostname().lower())[:40].strip("-.") or "host"
    return f"{host}-{os.getpid()}-{os.urandom(3).hex()}"


def _p_floor(looks: list[dict]) -> float | None:
    """The smallest always-valid p among recorded looks (None before any)."""
    ps = [look["sequential_p"] for look in looks if look.get("sequential_p") is not None]
    return min(ps) if ps else None


def _load(raw: bytes | None, default: Any) -> Any:
    return default if raw is None else json.loads(raw)


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class Experiments(StoreWorker):
    """Every tenant's experiments in ``store``; attach to an engine to route its live traffic."""

    HOOKS = (("choosers", "choose"), ("scored_hooks", "observe"), ("failed_hooks", "failed"))
    THREAD = "headfleet-experiments"

    def __init__(self, engine: Engine | None, store, *, registry=None, interval_s: float = 0.5,
                 refresh_s: float = 1.0, clock: Callable[[], float] = time.time, replica: str | None = None):
        """``engine`` None with a ``registry``: read and stop only (the CLI, without a backbone)."""
        self.engine, self.store, self.clock = engine, store, clock
        self.registry = registry if registry is not None else engine.registry
        self.interval_s, self.refresh_s = interval_s, refresh_s
        self.replica = replica or _replica_name()
        self.counts = collections.Counter()  # exposures_dropped, auto_stops
        self._running: dict[tuple[str, str], dict] = {}
        self._queue: collections.deque = collections.deque()
        self._known: dict[tuple[str, str], set[str]] = {}
        self._guard: dict[tuple[str, str], dict[str, dict]] = {}
        self._flush_lock = threading.Lock()
        self._checked: dict[tuple[str, str], float] = {}
        self._to_check: set[tuple[str, str]] = set()
        self._init_worker()

    # -- wiring: attach, start, close (StoreWorker) ------------------------------------------------
    def refresh(self) -> None:
        """Reload the running experiments of every tenant (one store read)."""
        doc = _load(self.store.get(RUNNING), {})
        self._running = {(t, c): cfg for t, per in doc.items() for c, cfg in per.items()}
        self._refreshed = self.clock()

    def summary(self) -> dict[str, int]:
        """Fleet-wide counts for metrics: running experiments (as last read), auto-stops, dropped exposures."""
        return {"running": len(self._running), "auto_stops": self.counts["auto_stops"],
                "exposures_dropped": self.counts["exposures_dropped"]}

    # -- the request path --------------------------------------------------------------------------
    def choose(self, choice: Choice) -> None:
        """Engine chooser: re-point a bare ref (or ``@latest``) of a running experiment to its arm."""
        if not self._running:
            return
        for ref in choice.refs:
            name, _, alias = ref.partition("@")
            cfg = self._running.get((choice.tenant, name)) if alias in ("", LATEST) else None
            if cfg is None:
                continue
            arm = assign(cfg["id"], choice.unit, cfg["split"]) if choice.unit is not None else "control"
            version = cfg[arm]["version"]
            choice.targets[ref] = f"{name}@{version}"
            choice.tags[ref] = {"experiment": {"id": cfg["id"], "arm": arm, "version": version}}

    def observe(self, scored: Scored) -> None:
        """Scored hook: queue the exposure and latency of each experiment the request was routed by."""
        if scored.source == "classify" and scored.route is not None:
            self._enqueue(scored.tenant, scored.route, scored.ms, False)

    def failed(self, tenant: str, route: Route, exc: BaseException) -> None:
        """Failed hook: a request that failed after routing counts as an error of its arms, unless
        the failure was the client's or the queue's (a 4xx, a 429, a client that left)."""
        if isinstance(exc, _NOT_THE_ARMS_FAULT) or not isinstance(exc, Exception):
            return
        self._enqueue(tenant, route, None, True)

    def _enqueue(self, tenant: str, route: Route, ms: float | None, error: bool) -> None:
        if route.unit is None or not route.tags:
            return
        for tag in route.tags.values():
            exp = tag.get("experiment")
            if exp is None:
                continue
            if len(self._queue) >= QUEUE_MAX:
                self.counts["exposures_dropped"] += 1
                return
            self._queue.append((tenant, exp["id"], exp["arm"], route.unit, ms, error))

    # -- folding into the store ----------------------------------------------------------------------
    def flush(self, final: bool = False) -> None:
        """Fold queued exposures into the store: new units into each experiment's unit set, this
        replica's guardrail counters; then stop any experiment whose treatment breached a guardrail."""
        with self._flush_lock:
            self._to_check |= self._fold()
            due = list(self._to_check)
        for tenant, exp_id in due:
            self._check_guardrails(tenant, exp_id)

    def _fold(self) -> set[tuple[str, str]]:
        """Drain the queue into the store (caller holds ``_flush_lock``); returns the experiments touched."""
        fresh: dict[tuple[str, str], dict[str, str]] = {}
        touched: set[tuple[str, str]] = set()
        while self._queue:
            tenant, exp_id, arm, unit, ms, error = self._queue.popleft()
            key = (tenant, exp_id)
            known = self._known.get(key)
            if known is None or unit not in known:
                fresh.setdefault(key, {})[unit] = arm
            counts = self._guard.setdefault(key, {a: guardrails.new_counts() for a in ARMS})
            guardrails.add(counts[arm], ms, error)
            touched.add(key)
        for (tenant, exp_id), units in fresh.items():
            with self.store.lock(f"{tenant}/{exp_id}"):
                doc = _load(self.store.get(f"{tenant}/{exp_id}/units"), {"units": {}})
                doc["units"].update(units)
                self.store.put(f"{tenant}/{exp_id}/units", _dump(doc))
            self._known[(tenant, exp_id)] = set(doc["units"])
        for tenant, exp_id in touched:
            self.store.put(f"{tenant}/{exp_id}/guard/{self.replica}", _dump(self._guard[(tenant, exp_id)]))
        return touched

    def _check_guardrails(self, tenant: str, exp_id: str) -> None:
        """Judge an experiment that had traffic since its last judgement (at most every GUARD_CHECK_S)."""
        now = self.clock()
        if now - self._checked.get((tenant, exp_id), float("-inf")) < GUARD_CHECK_S:
            return
        self._checked[(tenant, exp_id)] = now
        self._to_check.discard((tenant, exp_id))
        cfg = self._config(tenant, exp_id)
        if cfg.get("state") != "running" or not cfg["guardrails"]:
            return
        report = self.report(tenant, exp_id, flush=False)
        breached = report["guardrails"]["treatment"]["breached"]
        if breached and report["guardrails"]["judged"]:
            self.counts["auto_stops"] += 1
            log.warning("experiment %s/%s: treatment breached %s; rolling back", tenant, exp_id, breached)
            try:
                self.stop(tenant, exp_id, "rollback", reason=f"guardrail breached by the treatment: {breached}",
                          flush=False)
            except ConflictError:
                pass  # another replica stopped it first

    # -- the API's operations ----------------------------------------------------------------------
    def create(self, tenant: str, body: Any) -> dict:
        """Start an experiment; 404 for an unknown classifier or arm, 409 when one already runs on
        the classifier, 422 for a bad field. Returns what ``report`` returns (no units yet)."""
        cfg = check_config(body, lambda ref: self.registry.resolve(tenant, ref))
        record = dict(cfg, state="running", decision=None, stopped=None, reason=None)
        with self.store.lock(RUNNING):
            doc = _load(self.store.get(RUNNING), {})
            other = doc.get(tenant, {}).get(cfg["classifier"])
            if other is not None:
                raise ConflictError(f"experiment {other['id']!r} is already running on classifier "
                                    f"{cfg['classifier']!r}; stop it first")
            self.store.put(f"{tenant}/{cfg['id']}/config", _dump(record))
            doc.setdefault(tenant, {})[cfg["classifier"]] = cfg
            self.store.put(RUNNING, _dump(doc))
            self._running = {(t, c): v for t, per in doc.items() for c, v in per.items()}
        return self.report(tenant, cfg["id"], flush=False)

    def _config(self, tenant: str, exp_id: str) -> dict:
        raw = None
        if isinstance(exp_id, str) and re.fullmatch(r"exp-[0-9a-f]{12}", exp_id):
            raw = self.store.get(f"{tenant}/{exp_id}/config")
        if raw is None:  # another tenant's id answers exactly like a made-up one
            raise NotFoundError(f"no experiment {exp_id!r}")
        return json.loads(raw)

    def list(self, tenant: str, *, limit: int = 50, after: str | None = None) -> dict:
        """The tenant's experiments, newest first, ``limit`` per page; ``next``: the ``after`` of the
        next page (None on the last)."""
        ids = [k.split("/")[1] for k in self.store.keys(tenant) if k.count("/") == 2 and k.endswith("/config")]
        records = sorted((self._config(tenant, i) for i in ids), key=lambda r: (r.get("created_ts", 0.0), r["id"]), reverse=True)
        if after is not None:
            at = next((i for i, r in enumerate(records) if r["id"] == after), None)
            if at is None:
                raise NotFoundError(f"after: no experiment {after!r} in this tenant's listing")
            records = records[at + 1:]
        page = records[:limit]
        summary = [{k: r[k] for k in ("id", "name", "classifier", "control", "treatment", "state", "decision",
                                      "created", "stopped")} for r in page]
        return {"experiments": summary, "next": page[-1]["id"] if len(records) > limit else None}

    def add_outcomes(self, tenant: str, exp_id: str, body: Any) -> dict:
        """``{"items": [{"unit", "value", "id"?, "segment"?}]}`` -> ``{"accepted", "duplicates",
        "refused": [{"index", "reason"}]}``. A unit this experiment never exposed, a value that is not
        a finite number, or a bad field refuses that item only; a repeated ``id`` is a duplicate
        (ignored). 409 once the experiment stopped; 422 for a body that is not a list of items."""
        cfg = self._config(tenant, exp_id)
        if cfg["state"] != "running":
            raise ConflictError(f"experiment {exp_id!r} is stopped ({cfg['decision']}); its result is final")
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items or len(items) > MAX_ITEMS:
            raise ValidationError(f"items must be a list of 1-{MAX_ITEMS} {{\"unit\", \"value\"}} objects",
                                  param="items")
        if isinstance(body, dict) and set(body) - {"items"}:
            raise ValidationError(f"unknown field(s) {sorted(set(body) - {'items'})}")
        self.flush()  # this replica's exposures first, so a unit it just served counts as exposed
        accepted, duplicates, refused = 0, 0, []
        with self.store.lock(f"{tenant}/{exp_id}"):
            units = _load(self.store.get(f"{tenant}/{exp_id}/units"), {"units": {}})["units"]
            doc = _load(self.store.get(f"{tenant}/{exp_id}/outcomes"), {"values": {}, "ids": {}, "segments": {}})
            seen_now: set[str] = set()
            for i, item in enumerate(items):
                reason = check_item(item, units)
                if reason:
                    refused.append({"index": i, "reason": reason})
                    continue
                oid = item.get("id")
                if oid is not None and (oid in doc["ids"] or oid in seen_now):
                    duplicates += 1
                    continue
                if oid is not None:
                    seen_now.add(oid)
                    doc["ids"][oid] = 1
                unit = item["unit"]
                doc["values"][unit] = doc["values"].get(unit, 0.0) + float(item["value"])
                if item.get("segment") is not None:
                    doc["segments"][unit] = item["segment"]
                accepted += 1
            if accepted:
                self.store.put(f"{tenant}/{exp_id}/outcomes", _dump(doc))
                self._record_look(tenant, exp_id, cfg, units, doc["values"])
        return {"accepted": accepted, "duplicates": duplicates, "refused": refused}

    def _record_look(self, tenant: str, exp_id: str, cfg: dict, units: dict, values: dict) -> None:
        """Append this look (the figures after an accepted outcomes post) to the experiment's looks:
        the lift as it accrues, and the running minimum of the always-valid p. Caller holds the
        experiment's lock."""
        looks = _load(self.store.get(f"{tenant}/{exp_id}/looks"), [])
        arms = {a: unit_values(units, values, a, cfg["missing"]) for a in ARMS}
        stats = experiment_stats.compare(arms["control"], arms["treatment"], split=cfg["split"],
                                         min_samples=cfg["min_samples"], sequential=cfg["sequential"],
                                         p_floor=_p_floor(looks))
        looks.append({"at": iso(time.time()), "n_control": int(arms["control"].size),
                      "n_treatment": int(arms["treatment"].size), "lift": stats["lift"], "ci95": stats["ci95"],
                      "sequential_p": stats["sequential_p"]})
        if len(looks) > MAX_LOOKS:  # thin the older half; the newest half stays whole
            half = len(looks) // 2
            looks = looks[:half:2] + looks[half:]
        self.store.put(f"{tenant}/{exp_id}/looks", _dump(looks))

    def report(self, tenant: str, exp_id: str, *, flush: bool = True) -> dict:
        """The experiment's record and its statistics now (a stopped one: as frozen at the stop)."""
        if flush:
            self._config(tenant, exp_id)  # 404 before any work
            self.flush()
        cfg = self._config(tenant, exp_id)
        if cfg["state"] != "running" and cfg.get("result") is not None:
            return cfg["result"] | {"state": cfg["state"], "decision": cfg["decision"], "stopped": cfg["stopped"],
                                    "reason": cfg["reason"]}
        units = _load(self.store.get(f"{tenant}/{exp_id}/units"), {"units": {}})["units"]
        doc = _load(self.store.get(f"{tenant}/{exp_id}/outcomes"), {"values": {}, "ids": {}, "segments": {}})
        values, segments = doc["values"], doc["segments"]
        arms = {a: unit_values(units, values, a, cfg["missing"]) for a in ARMS}
        looks = _load(self.store.get(f"{tenant}/{exp_id}/looks"), [])
        stats = experiment_stats.compare(arms["control"], arms["treatment"], split=cfg["split"],
                                         min_samples=cfg["min_samples"], sequential=cfg["sequential"],
                                         p_floor=_p_floor(looks))
        guard = self._guardrails(tenant, exp_id, cfg, stats)
        recommendation, reason = stats["recommendation"], stats["reason"]
        if guard["judged"] and guard["treatment"]["breached"]:
            recommendation, reason = "rollback", f"the treatment breached {guard['treatment']['breached']}"
        arm_view = {a: {"version": cfg[a]["version"], **stats["arms"][a]} for a in ARMS}
        public = {k: cfg[k] for k in ("name", "classifier", "control", "treatment", "split", "metric",
                                      "min_samples", "guardrails", "sequential", "missing", "created")}
        return {"id": exp_id, "config": public, "state": cfg["state"], "decision": cfg["decision"],
                "stopped": cfg["stopped"], "reason": cfg["reason"], "arms": arm_view,
                "lift": stats["lift"], "relative_lift": stats["relative_lift"], "ci95": stats["ci95"],
                "welch": stats["welch"], "srm_p": stats["srm_p"], "srm": stats["srm"],
                "sequential_p": stats["sequential_p"], "p": stats["p"], "guardrails": guard,
                "slices": slices(units, values, segments, cfg), "looks": looks,
                "recommendation": recommendation, "recommendation_reason": reason}

    def _guardrails(self, tenant: str, exp_id: str, cfg: dict, stats: dict) -> dict:
        docs = [_load(self.store.get(k), {}) for k in self.store.keys(f"{tenant}/{exp_id}/guard")]
        out = {a: guardrails.status(guardrails.merge([d.get(a, {}) for d in docs]), cfg["guardrails"]) for a in ARMS}
        out["judged"] = all(stats["arms"][a]["n_units"] >= cfg["min_samples"] for a in ARMS)
        out["limits"] = cfg["guardrails"]
        return out

    def stop(self, tenant: str, exp_id: str, decision: Any, *, reason: str = "stopped by request",
             flush: bool = True) -> dict:
        """``promote``: ``latest`` -> the treatment's pinned version; ``rollback``: ``latest`` -> the
        control's. One atomic alias write, then the record (with the full result) is frozen.
        409 when it already stopped; 422 for another decision."""
        if decision not in ("promote", "rollback"):
            raise ValidationError("decision must be \"promote\" or \"rollback\"", param="decision")
        self._config(tenant, exp_id)  # 404 before anything else
        if flush:
            self.flush()
        with self.store.lock(RUNNING):
            cfg = self._config(tenant, exp_id)
            if cfg["state"] != "running":
                raise ConflictError(f"experiment {exp_id!r} already stopped ({cfg['decision']}: {cfg['reason']})")
            result = self.report(tenant, exp_id, flush=False)
            arm = "treatment" if decision == "promote" else "control"
            self.registry.set_alias(tenant, cfg["classifier"], LATEST, cfg[arm]["version"])
            self._finish(tenant, cfg, decision, reason, result)
        return self.report(tenant, exp_id, flush=False)

    def _finish(self, tenant: str, cfg: dict, decision: str | None, reason: str, result: dict | None) -> None:
        """Freeze the record and take it out of ``running`` (caller holds the RUNNING lock)."""
        cfg.update(state="stopped", decision=decision, stopped=iso(self.clock()), reason=reason)
        if result is not None:
            cfg["result"] = {k: v for k, v in result.items()
                             if k not in ("state", "decision", "stopped", "reason")}
        self.store.put(f"{tenant}/{cfg['id']}/config", _dump(cfg))
        doc = _load(self.store.get(RUNNING), {})
        per = doc.get(tenant, {})
        if per.get(cfg["classifier"], {}).get("id") == cfg["id"]:
            del per[cfg["classifier"]]
            if not per:
                doc.pop(tenant, None)
            self.store.put(RUNNING, _dump(doc))
        self._running = {(t, c): v for t, per in doc.items() for c, v in per.items()}

    def forget(self, tenant: str, classifier: str) -> None:
        """The classifier was deleted: its running experiment stops with no decision (nothing to move)."""
        with self.store.lock(RUNNING):
            cfg = _load(self.store.get(RUNNING), {}).get(tenant, {}).get(classifier)
            if cfg is not None:
                record = self._config(tenant, cfg["id"])
                try:
                    result = self.report(tenant, cfg["id"], flush=False)
                except Exception:
                    result = None
                self._finish(tenant, record, None, "the classifier was deleted", result)
