"""Alerts and the retrain trigger: the *conjunction* of drift and an accuracy drop, never one alone.

After each closed window: a ``drift`` alert when the window drifted, an ``accuracy_drop`` alert
when its canary accuracy dropped. When the last ``consecutive`` windows of the version all have
both, ``auto_retrain`` is on, no retrain of the classifier is running and the last trigger is
older than ``cooldown_seconds``, a retraining job starts (``lifecycle.retrain``) and a ``retrain``
alert is raised. Drift alone (a benign shift: new traffic the head still gets right) never
triggers; neither does an accuracy drop on traffic that did not move.

Alerts are kept per classifier (``<tenant>/<name>/alerts``, the newest ``retention_windows``) and
each is POSTed to the ``webhook`` when one is set. The retrain state
(``<tenant>/<name>/retrain``) is ``{"triggered", "reason", "job", "candidate", "state", "at"}``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from headfleet.lifecycle.retrain import make_review, retraining_data
from headfleet.lifecycle.settings import MonitorSettings
from headfleet.lifecycle.windows import iso

log = logging.getLogger(__name__)

NO_RETRAIN = {"triggered": False, "reason": None, "job": None, "candidate": None, "state": None, "at": None}
_SIGNALS = ("start", "end", "texts", "label_psi", "domain_auc", "mmd2", "canary_accuracy", "estimated_accuracy")


class TriggerMixin:
    def after_close(self, tenant: str, name: str, manifest: dict, settings: MonitorSettings, report: dict,
                    windows: list[dict]) -> None:
        figures = {k: report.get(k) for k in _SIGNALS}
        if report["drift"]:
            self.alert(tenant, name, settings, "drift", report, {"label_psi": report["label_psi"],
                                                                 "domain_auc": report["domain_auc"]})
        if report["accuracy_drop"]:
            self.alert(tenant, name, settings, "accuracy_drop", report, {
                "canary_accuracy": report["canary_accuracy"], "accuracy_slo": settings.accuracy_slo,
                "holdout_accuracy": (manifest.get("metrics") or {}).get("accuracy")})
        last = windows[-settings.consecutive:]
        if len(last) < settings.consecutive or not all(w["drift"] and w["accuracy_drop"] for w in last):
            return
        if not settings.auto_retrain:
            return
        state = self.retrain_state(tenant, name)
        now = self.clock()
        if state.get("state") in ("queued", "running"):
            return
        if state.get("at") is not None and now - state["at"] < settings.cooldown_seconds:
            return
        if "adapter" in manifest:
            self.alert(tenant, name, settings, "retrain", report,
                       {"started": False, "why": "LoRA classifiers are not retrained automatically; "
                                                 "train a new version with the feedback"})
            return
        reason = (f"drift and accuracy drop in {settings.consecutive} consecutive window(s) of {manifest['id']}: "
                  f"canary accuracy {report['canary_accuracy']}, label PSI {report['label_psi']}, "
                  f"domain AUC {report['domain_auc']}")
        trigger = {"reason": reason, "windows": [{k: w.get(k) for k in _SIGNALS} for w in last]}
        self._start(tenant, name, manifest, settings, trigger, report, figures)

    def _start(self, tenant: str, name: str, manifest: dict, settings: MonitorSettings, trigger: dict,
               report: dict, figures: dict) -> None:
        feedback = self.book.feedback(tenant, name)
        canary = self.book.canary(tenant, name, settings.rolling_canary)
        live_canary = report["canary_accuracy"]
        seed = int((manifest.get("metrics") or {}).get("seed") or 0)

        def run(embed, progress=None) -> dict:
            try:
                self._set_retrain(tenant, name, state="running")
                examples = retraining_data(self.engine, tenant, manifest, feedback, seed=self.seed)
                review = make_review(self.engine, tenant, manifest, canary, live_canary, trigger,
                                     settings.accuracy_drop, embed)
                out = self.engine.train(tenant, name, examples, kind=manifest["type"], seed=seed,
                                        progress=progress, embed=embed, candidate=True, review=review)
            except Exception as exc:
                self._set_retrain(tenant, name, state="failed", error=str(exc))
                raise
            self._set_retrain(tenant, name, state="succeeded", candidate=out["id"])
            return out

        state = {"triggered": True, "reason": trigger["reason"], "job": None, "candidate": None,
                 "state": "queued", "at": self.clock(), "from": manifest["id"]}
        self._put_retrain(tenant, name, state)
        if self.start_retrain is not None:
            job = self.start_retrain(tenant, name, run, len(feedback.texts))
            self._set_retrain(tenant, name, job=job["id"])
        else:
            compute = self.compute_for(tenant)

            def embed(t, texts, progress=None):
                return self.engine.embed(t, texts, compute=compute, progress=progress)

            threading.Thread(target=self._run_quietly, args=(run, embed), daemon=True).start()
        with self._count_lock:
            self.counts["retrains"] += 1
        self.alert(tenant, name, settings, "retrain", report, {"started": True, "reason": trigger["reason"],
                                                              "job": self.retrain_state(tenant, name)["job"]})

    @staticmethod
    def _run_quietly(run, embed) -> None:
        try:
            run(embed)
        except Exception:
            log.exception("automatic retrain failed")

    # -- state -------------------------------------------------------------------------------------
    def retrain_state(self, tenant: str, name: str) -> dict[str, Any]:
        raw = self.store.get(f"{tenant}/{name}/retrain")
        return dict(NO_RETRAIN) if raw is None else json.loads(raw)

    def _put_retrain(self, tenant: str, name: str, state: dict) -> None:
        with self.store.lock(f"{tenant}/{name}"):
            self.store.put(f"{tenant}/{name}/retrain", json.dumps(state).encode())

    def _set_retrain(self, tenant: str, name: str, **changes: Any) -> None:
        with self.store.lock(f"{tenant}/{name}"):
            state = json.loads(self.store.get(f"{tenant}/{name}/retrain") or b"{}")
            state.update(changes)
            self.store.put(f"{tenant}/{name}/retrain", json.dumps(state).encode())

    def alert(self, tenant: str, name: str, settings: MonitorSettings, kind: str, report: dict, detail: dict) -> None:
        entry = {"at": iso(self.clock()), "kind": kind, "window": {"start": report["start"], "end": report["end"]},
                 "version": report.get("version"), "detail": detail}
        with self.store.lock(f"{tenant}/{name}"):
            alerts = json.loads(self.store.get(f"{tenant}/{name}/alerts") or b"[]")
            alerts.append(entry)
            self.store.put(f"{tenant}/{name}/alerts", json.dumps(alerts[-settings.retention_windows:]).encode())
        with self._count_lock:
            self.counts[f"alerts_{kind}"] += 1
        if settings.webhook:
            self.webhooks.send(settings.webhook, {"tenant": tenant, "classifier": name, **entry})
