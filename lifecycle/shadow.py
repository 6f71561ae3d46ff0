"""Shadow scoring: a second version of a classifier scored on live traffic, never answered.

How it costs (almost) nothing and changes nothing for the caller:

- ``choose`` (an engine chooser, memory only) adds the shadow version beside the first ref of its
  classifier in every live ``/classify``. The engine scores it in the same embedding group, so for
  a head shadow it is one more key in the batched head operation on vectors the request already
  has. A shadow that reads another embedding than the live version (either is a LoRA adapter)
  costs a backbone forward per text, so it runs on a ``sample`` share of requests only.
- The engine takes the shadow's entries out of the answer (``"debug": true`` shows them); the
  ``scored_hooks`` observer only queues them. A background thread counts agreement and flips per
  (live version, shadow version) pair and keeps the newest ``TEXTS_MAX`` texts' two predictions
  per replica, so ``/feedback`` labels can say which version was right.
- Replicas add up: each keeps its own counter documents under the shadow's run; readers sum them.

Figures (``report``): agreement and the full flip matrix (McNemar's table when joined with labels:
McNemar, *Psychometrika* 12, 1947; exact form: a two-sided binomial test of the discordant pairs,
``scipy.stats.binomtest``). Store (the monitor's): ``shadows`` (every running shadow, by tenant),
``<tenant>/<name>/shadow`` (its config), ``<tenant>/<name>/shadows/<run>/{stats,texts}/<replica>``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import threading
import time
from typing import Any, Callable

from scipy import stats as sps

from headfleet.engine import Choice, Engine, Scored
from headfleet.errors import ValidationError
from headfleet.lifecycle.experiments import _replica_name
from headfleet.lifecycle.feedback import FeedbackBook, text_key
from headfleet.lifecycle.windows import iso
from headfleet.lifecycle.worker import StoreWorker

log = logging.getLogger(__name__)

INDEX = "shadows"
TEXTS_MAX = 10_000  # newest texts whose two predictions a replica keeps for the feedback join
TEXTS_WRITE_S = 5.0  # how often a replica rewrites its texts document (a report forces it)
QUEUE_MAX = 10_000


def _load(raw: bytes | None, default: Any) -> Any:
    return default if raw is None else json.loads(raw)


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _label(entry: dict, multi: bool):
    return sorted(entry["labels"]) if multi else entry["label"]


class Shadows(StoreWorker):
    """Every tenant's shadows, kept in the monitor's ``store``; ``book`` reads ``/feedback`` labels."""

    HOOKS = (("choosers", "choose"), ("scored_hooks", "observe"))
    THREAD = "headfleet-shadows"

    def __init__(self, engine: Engine | None, store, book: FeedbackBook | None = None, *, registry=None,
                 interval_s: float = 0.5, refresh_s: float = 1.0, clock: Callable[[], float] = time.time,
                 replica: str | None = None, seed: int | None = None):
        """``engine`` None with a ``registry``: reports only (the CLI, without a backbone)."""
        self.engine, self.store, self.clock = engine, store, clock
        self.registry = registry if registry is not None else engine.registry
        self.book = book or FeedbackBook(store)
        self.interval_s, self.refresh_s = interval_s, refresh_s
        self.replica = replica or _replica_name()
        self.counts = collections.Counter()  # observations_dropped
        self._active: dict[tuple[str, str], dict] = {}
        self._queue: collections.deque = collections.deque()
        self._stats: dict[tuple[str, str, str], dict] = {}  # (tenant, name, run) -> pair -> counters
        self._texts: dict[tuple[str, str, str], dict] = {}  # (tenant, name, run) -> text key -> record
        self._dirty: set[tuple[str, str, str]] = set()
        self._texts_written: dict[tuple[str, str, str], float] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._init_worker()

    # -- wiring: attach, start, close (StoreWorker) ------------------------------------------------
    def refresh(self) -> None:
        doc = _load(self.store.get(INDEX), {})
        self._active = {(t, n): cfg for t, per in doc.items() for n, cfg in per.items()}
        self._refreshed = self.clock()

    def summary(self) -> dict[str, int]:
        """Fleet-wide counts for metrics: active shadows (as last read), dropped observations."""
        return {"active": len(self._active), "observations_dropped": self.counts["observations_dropped"]}

    # -- the request path ----------------------------------------------------------------------------
    def choose(self, choice: Choice) -> None:
        """Engine chooser: add the classifier's shadow beside the first ref that names it."""
        if not self._active:
            return
        named: set[str] = set()
        for ref in choice.refs:
            name = ref.partition("@")[0]
            cfg = self._active.get((choice.tenant, name))
            if cfg is None or name in named:
                continue
            named.add(name)
            if cfg["sample"] is not None and self._rng.random() >= cfg["sample"]:
                continue
            choice.shadows[ref] = f"{name}@{cfg['version']}"

    def observe(self, scored: Scored) -> None:
        if scored.shadows and scored.source == "classify":
            if len(self._queue) >= QUEUE_MAX:
                self.counts["observations_dropped"] += 1
                return
            self._queue.append(scored)

    # -- configuration -------------------------------------------------------------------------------
    def set(self, tenant: str, name: str, body: Any) -> dict:
        """Start (or replace) the shadow of ``name``: ``{"version": 4 | "candidate", "sample"?: 0.1}``.

        The version is pinned now. ``sample`` (0 < sample <= 1) is required when the shadow costs a
        backbone forward (it or the live version is a LoRA adapter) and refused otherwise (422); 404
        for an unknown classifier or version; 422 when it is the version ``latest`` serves. Counters
        of an earlier shadow of ``name`` are dropped."""
        if not isinstance(body, dict):
            raise ValidationError("the body must be a JSON object like {\"version\": 4}")
        unknown = sorted(set(body) - {"version", "sample"})
        if unknown:
            raise ValidationError(f"unknown field(s) {unknown}; allowed: ['sample', 'version']", param=unknown[0])
        version = body.get("version")
        if isinstance(version, bool) or not isinstance(version, (int, str)) or version == "":
            raise ValidationError("version must be a version number or an alias (\"candidate\")", param="version")
        live = self.registry.resolve(tenant, name)
        name = live["name"]
        shadow = self.registry.resolve(tenant, f"{name}@{version}")
        if shadow["version"] == live["version"]:
            raise ValidationError(f"version {shadow['version']} is what {name!r} serves now (latest); "
                                  "a shadow must be another version", param="version")
        costly = bool(shadow.get("adapter")) or bool(live.get("adapter"))
        sample = body.get("sample")
        if costly:
            if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
                raise ValidationError("this shadow reads another embedding than the live version (a LoRA adapter "
                                      "is involved), so it costs a backbone forward per text: say which share of "
                                      "requests pays it, e.g. \"sample\": 0.1 (0 < sample <= 1)", param="sample")
            sample = float(sample)
        elif sample is not None:
            raise ValidationError("sample is only for LoRA shadows: a head shadow is one more row of the batched "
                                  "head operation and scores every request", param="sample")
        cfg = {"classifier": name, "version": int(shadow["version"]), "ref": str(version), "sample": sample,
               "started": iso(self.clock()), "run": os.urandom(4).hex(), "live_version": int(live["version"])}
        with self.store.lock(INDEX):
            old = _load(self.store.get(f"{tenant}/{name}/shadow"), None)
            self.store.put(f"{tenant}/{name}/shadow", _dump(cfg))
            doc = _load(self.store.get(INDEX), {})
            doc.setdefault(tenant, {})[name] = cfg
            self.store.put(INDEX, _dump(doc))
            self._active = {(t, n): c for t, per in doc.items() for n, c in per.items()}
        if old is not None:
            self.store.delete_prefix(f"{tenant}/{name}/shadows")
        return self.state(tenant, name, cfg)

    def config(self, tenant: str, name: str) -> dict | None:
        return _load(self.store.get(f"{tenant}/{name}/shadow"), None)

    def remove(self, tenant: str, name: str) -> dict:
        """Stop the shadow of ``name``; returns its last report (404 when it has none)."""
        report = self.report(tenant, name)
        self.forget(tenant, name)
        self.store.delete_prefix(f"{tenant}/{name}/shadows")
        return report | {"stopped": True}

    def state(self, tenant: str, name: str, cfg: dict) -> dict:
        return {"classifier": cfg["classifier"], "shadow": f"{cfg['classifier']}@{cfg['version']}",
                "version": cfg["version"], "ref": cfg["ref"], "sample": cfg["sample"], "started": cfg["started"]}

    # -- counting ------------------------------------------------------------------------------------
    def flush(self, force: bool = False, final: bool = False) -> None:
        """Count the queued requests, then write this replica's changed counter documents."""
        force = force or final
        with self._lock:
            while self._queue:
                self._count(self._queue.popleft())
            now = self.clock()
            for key in list(self._dirty):
                tenant, name, run = key
                prefix = f"{tenant}/{name}/shadows/{run}"
                self.store.put(f"{prefix}/stats/{self.replica}", _dump(self._stats[key]))
                if force or now - self._texts_written.get(key, float("-inf")) >= TEXTS_WRITE_S:
                    self.store.put(f"{prefix}/texts/{self.replica}", _dump(self._texts.get(key, {})))
                    self._texts_written[key] = now
                    self._dirty.discard(key)
            for key in [k for k in self._stats if (k[0], k[1]) not in self._active
                        or self._active[(k[0], k[1])]["run"] != k[2]]:
                self._stats.pop(key, None)  # a stopped or replaced shadow
                self._texts.pop(key, None)
                self._dirty.discard(key)

    def _count(self, scored: Scored) -> None:
        live_by_ref = {r.ref: r.manifest for r in scored.resolved}
        for ref, entries in scored.shadows.items():
            live = live_by_ref.get(ref)
            cfg = self._active.get((scored.tenant, ref.partition("@")[0]))
            if live is None or cfg is None or not entries:
                continue
            lv, sv = int(live["version"]), int(entries[0]["version"])
            if lv == sv or sv != cfg["version"]:
                continue
            key = (scored.tenant, cfg["classifier"], cfg["run"])
            pair = self._stats.setdefault(key, {}).setdefault(f"{lv}-{sv}", _new_pair())
            texts = self._texts.setdefault(key, {})
            multi, s_multi = bool(live["multi_label"]), "labels" in entries[0]
            labels = list(dict.fromkeys([*live["labels"], *entries[0]["scores"]])) if multi else None
            for text, result, s_entry in zip(scored.texts, scored.answer["results"], entries):
                a, b = _label(result["classifications"][ref], multi), _label(s_entry, s_multi)
                _add(pair, a, b, labels)
                tk = text_key(text)
                texts.pop(tk, None)
                texts[tk] = [lv, a, sv, b]
            while len(texts) > TEXTS_MAX:
                texts.pop(next(iter(texts)))
            self._dirty.add(key)

    # -- reading -------------------------------------------------------------------------------------
    def report(self, tenant: str, name: str) -> dict:
        """``{"classifier", "live", "shadow", "n", "agreement", "flips", "per_label", "with_feedback",
        "also_compared", ...}`` for the pair (version ``latest`` serves, shadow version); 404 when
        ``name`` is unknown or has no shadow."""
        from headfleet.errors import NotFoundError

        live = self.registry.resolve(tenant, name)
        name = live["name"]
        cfg = self.config(tenant, name)
        if cfg is None:
            raise NotFoundError(f"classifier {name!r} has no shadow; start one with PUT /classifiers/{name}/shadow")
        self.flush(force=True)
        prefix = f"{tenant}/{name}/shadows/{cfg['run']}"
        pairs: dict[str, dict] = {}
        for key in self.store.keys(f"{prefix}/stats"):
            for pair, counts in _load(self.store.get(key), {}).items():
                pairs[pair] = _merge(pairs.get(pair), counts)
        lv, sv = int(live["version"]), cfg["version"]
        counts = pairs.get(f"{lv}-{sv}") or _new_pair()
        n, multi = counts["n"], bool(live["multi_label"])
        try:
            shadow_labels = self.registry.resolve(tenant, f"{name}@{sv}")["labels"]
        except Exception:  # the shadow version went with its classifier: its counts still read
            shadow_labels = []
        flips = _full_matrix(counts["flips"], live["labels"], shadow_labels, multi)
        out = self.state(tenant, name, cfg) | {
            "live": f"{name}@{lv}", "n": n, "agreement": round(counts["agree"] / n, 6) if n else None,
            "flips": flips, "per_label": _per_label(counts | {"flips": flips}, multi),
            "also_compared": {f"{name}@{p.split('-')[0]}": c["n"] for p, c in sorted(pairs.items())
                              if p != f"{lv}-{sv}"},
        }
        out["with_feedback"] = self._with_feedback(tenant, name, prefix, lv, sv, multi)
        if lv == sv:
            out["note"] = (f"latest now serves the shadow's version {sv}: nothing is compared until the shadow "
                           "is set to another version (PUT) or stopped (DELETE)")
        return out

    def _with_feedback(self, tenant: str, name: str, prefix: str, lv: int, sv: int, multi: bool) -> dict:
        records: dict[str, list] = {}
        for key in self.store.keys(f"{prefix}/texts"):
            records.update(_load(self.store.get(key), {}))
        fb = self.book.feedback(tenant, name)
        both = live_right = shadow_right = negative = positive = 0
        for text, label in zip(fb.texts, fb.labels):
            rec = records.get(text_key(text))
            if rec is None or rec[0] != lv or rec[2] != sv:
                continue
            truth = sorted(label) if multi else label
            a, b = rec[1] == truth, rec[3] == truth
            both += 1
            live_right += a
            shadow_right += b
            negative += a and not b
            positive += b and not a
        discordant = negative + positive
        return {"n": both, "live_accuracy": round(live_right / both, 6) if both else None,
                "shadow_accuracy": round(shadow_right / both, 6) if both else None,
                "negative_flips": negative, "positive_flips": positive,
                "mcnemar_p": float(sps.binomtest(negative, discordant, 0.5).pvalue) if discordant else None}

    def forget(self, tenant: str, name: str) -> None:
        """Take ``name``'s shadow out of the index and drop its config (stopping it, or its classifier
        was deleted: then the monitor's ``forget`` clears the rest of its keys)."""
        with self.store.lock(INDEX):
            self.store.delete(f"{tenant}/{name}/shadow")
            doc = _load(self.store.get(INDEX), {})
            if doc.get(tenant, {}).pop(name, None) is not None:
                if not doc[tenant]:
                    del doc[tenant]
                self.store.put(INDEX, _dump(doc))
            self._active = {(t, n): c for t, per in doc.items() for n, c in per.items()}


def _new_pair() -> dict:
    return {"n": 0, "agree": 0, "flips": {}}


def _add(pair: dict, live, shadow, labels: list[str] | None) -> None:
    """Count one text. Single-label (``labels`` None): ``flips[live][shadow] += 1``; multi-label: per
    label of ``labels``, ``flips[label][on|off (live)][on|off (shadow)] += 1``."""
    pair["n"] += 1
    pair["agree"] += live == shadow
    flips = pair["flips"]
    if labels is None:
        row = flips.setdefault(str(live), {})
        row[str(shadow)] = row.get(str(shadow), 0) + 1
        return
    on_live, on_shadow = set(live), set(shadow)
    for label in labels:
        m = flips.setdefault(label, {"on": {"on": 0, "off": 0}, "off": {"on": 0, "off": 0}})
        m["on" if label in on_live else "off"]["on" if label in on_shadow else "off"] += 1


def _full_matrix(flips: dict, live_labels: list[str], shadow_labels: list[str], multi: bool) -> dict:
    """``flips`` with a zero in every cell never counted: single-label, every live label (rows) by
    every shadow label (columns), labels either version predicted included; multi-label, every label
    of either version with its 2x2 on/off table."""
    if multi:
        out = {}
        for label in dict.fromkeys([*live_labels, *shadow_labels, *flips]):
            m = flips.get(label, {})
            out[label] = {a: {b: m.get(a, {}).get(b, 0) for b in ("on", "off")} for a in ("on", "off")}
        return out
    rows = list(dict.fromkeys([*live_labels, *flips]))
    cols = list(dict.fromkeys([*shadow_labels, *(c for row in flips.values() for c in row)]))
    return {r: {c: flips.get(r, {}).get(c, 0) for c in cols} for r in rows}


def _merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return json.loads(json.dumps(b))
    out = {"n": a["n"] + b["n"], "agree": a["agree"] + b["agree"], "flips": json.loads(json.dumps(a["flips"]))}
    for row, cols in b["flips"].items():
        dst = out["flips"].setdefault(row, {})
        for col, v in cols.items():
            if isinstance(v, dict):  # multi-label: {"on": {...}, "off": {...}}
                d = dst.setdefault(col, {})
                for k, x in v.items():
                    d[k] = d.get(k, 0) + x
            else:
                dst[col] = dst.get(col, 0) + v
    return out


def _per_label(counts: dict, multi: bool) -> dict:
    """Per label: how often each version predicted it, and the agreement on the texts the live version gave it."""
    flips, out = counts["flips"], {}
    if multi:
        for label, m in flips.items():
            live_on, shadow_on = sum(m["on"].values()), m["on"]["on"] + m["off"]["on"]
            out[label] = {"live": live_on, "shadow": shadow_on,
                          "agreement": round((m["on"]["on"] + m["off"]["off"]) / counts["n"], 6) if counts["n"] else None}
        return out
    labels = set(flips) | {c for row in flips.values() for c in row}
    for label in sorted(labels):
        live_n = sum(flips.get(label, {}).values())
        shadow_n = sum(row.get(label, 0) for row in flips.values())
        out[label] = {"live": live_n, "shadow": shadow_n,
                      "agreement": round(flips.get(label, {}).get(label, 0) / live_n, 6) if live_n else None}
    return out
