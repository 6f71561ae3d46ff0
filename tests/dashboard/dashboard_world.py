"""The dashboard tests' world: one real multi-tenant server after real traffic (see ``build``).

The server (``tests/service/http_server.py``, reused) serves tenants ``acme`` and ``globex`` and
the admin key. ``acme`` gets what the dashboard draws: a trained ``spam`` classifier (v1), an MLP
candidate (v2), monitoring with a canary that v1 partly fails, so drifting office chat closes
windows with drift and an accuracy drop and a retrain starts by itself (its candidate is v3); a
shadow of v2; an A/B experiment of v1 against v2 with outcomes from 40 units; and 120 more
classifiers (copies of v1's head saved through the registry) so the listing has three pages.
``globex`` trains and sends its own texts, which must never show on ``acme``'s pages.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from http_server import as_, running, wait_for_job  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ACME, GLOBEX, ADMIN = "acme-key-3f9a1c", "globex-key-77b2de", "admin-key-c0ffee"
GLOBEX_TEXT = "GLOBEX-CONFIDENTIAL merger memo for the board"
GLOBEX_CLASSIFIER = "globex-ledger"
BULK = 120

OFFICE = ["Can you review {s} before tomorrow's standup?", "Notes from {s} are in the shared folder",
          "Let's sync on {s} after lunch", "Heads up, {s} slipped to Friday"]
SUBJECTS = ["the deploy", "the quarterly report", "the design review", "the budget sheet", "the client demo",
            "the release notes", "the test plan", "the roadmap", "the vendor contract", "the style guide"]


def examples(name: str) -> list[dict]:
    with open(REPO / "engine" / "example_data" / f"{name}.csv", newline="", encoding="utf-8") as f:
        return [{"text": r["text"], "label": r["label"]} for r in csv.DictReader(f)]


def _train(c: httpx.Client, body: dict) -> dict:
    r = c.post("/classifiers", json=body)
    assert r.status_code == 202, r.text
    job = wait_for_job(c, r.json()["job"]["id"], timeout=300)
    assert job["state"] == "succeeded", job
    return job


@contextlib.contextmanager
def build(minilm, data: Path):
    """The server after all the traffic described above has stopped; yields a namespace of what was made."""
    with running(minilm, data, api_keys=f"acme:{ACME},globex:{GLOBEX}", admin_key=ADMIN, examples=False,
                 monitor_interval_s=0.2) as server, as_(server, ACME) as acme, as_(server, GLOBEX) as globex:
        _train(acme, {"name": "spam", "examples": examples("spam")})
        _train(acme, {"name": "spam", "examples": examples("spam"), "kind": "mlp", "candidate": True})
        r = acme.put("/classifiers/spam/monitor", json={"window_texts": 10, "accuracy_slo": 0.95, "consecutive": 1,
                                                          "cooldown_seconds": 3600})
        assert r.status_code == 200, r.text
        canary = [{"text": "Claim your free prize now, reply WIN", "label": "spam"},
                  {"text": "Lunch at noon tomorrow?", "label": "ham"},
                  {"text": "You won a cash reward, call this number today", "label": "ham"},  # v1 says spam
                  {"text": "The meeting notes are in the shared folder", "label": "ham"}]
        assert acme.put("/classifiers/spam/canary", json={"examples": canary}).status_code == 200
        office = [t.format(s=s) for t in OFFICE for s in SUBJECTS]  # 40 texts: four windows of ten
        for i in range(0, len(office), 10):
            r = acme.post("/classify", json={"texts": office[i:i + 10], "classifiers": ["spam"]})
            assert r.status_code == 200, r.text
        r = acme.post("/classify", json={"texts": office[:10], "classifiers": ["spam"]})  # all cache hits
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 300
        while True:  # the retrain the windows triggered runs to its end before anything is read
            report = acme.get("/classifiers/spam/monitor").json()
            if report["retrain"]["triggered"] and report["retrain"]["job"]:
                job = wait_for_job(acme, report["retrain"]["job"], timeout=300)
                assert job["state"] == "succeeded", job
                break
            assert time.monotonic() < deadline, f"no retrain triggered: {report}"
            time.sleep(0.2)
        assert acme.put("/classifiers/spam/shadow", json={"version": 2}).status_code == 200
        r = acme.post("/experiments", json={"name": "mlp head", "classifier": "spam", "control": "1", "treatment": "2",
                                            "metric": "conversion", "min_samples": 10})
        assert r.status_code == 201, r.text
        exp = r.json()["id"]
        arms = {}
        for i in range(40):
            r = acme.post("/classify", json={"texts": [office[i % 10]], "classifiers": ["spam"], "unit": f"user-{i}"})
            assert r.status_code == 200, r.text
            arms[f"user-{i}"] = r.json()["results"][0]["classifications"]["spam"]["experiment"]["arm"]
        items = [{"unit": u, "value": float((i % 5) < (3 if arm == "treatment" else 1)), "id": f"visit-{i}"}
                 for i, (u, arm) in enumerate(arms.items())]
        for part in (items[:20], items[20:]):  # two looks: the lift as it accrued
            assert acme.post(f"/experiments/{exp}/outcomes", json={"items": part}).json()["accepted"] == 20
        assert acme.post("/feedback", json={"classifier": "spam", "items": [
            {"text": office[0], "label": "ham"}, {"text": office[1], "label": "spam"}]}).status_code == 200
        # 120 more classifiers: v1's head saved again under other names, through the registry
        reg = server.service.engine.registry
        manifest, head = reg.load("acme", "spam@1")
        keep = {k: manifest[k] for k in ("parent_fingerprint", "tokenizer_hash", "metrics") if k in manifest}
        for i in range(BULK):
            reg.save("acme", f"bulk-{i:04d}", head, dict(keep))
        # globex: its own classifier and a text acme must never see
        _train(globex, {"name": GLOBEX_CLASSIFIER, "examples": examples("sentiment")})
        assert globex.post("/classify", json={"texts": [GLOBEX_TEXT], "classifiers": [GLOBEX_CLASSIFIER]}).status_code == 200
        r = globex.post("/experiments", json={"name": "globex secret test", "classifier": GLOBEX_CLASSIFIER,
                                              "control": "1", "treatment": "1"})
        assert r.status_code == 201, r.text

        class World:
            pass

        w = World()
        w.server, w.url, w.data, w.acme, w.globex, w.exp = server, server.url, data, acme, globex, exp
        w.globex_exp = r.json()["id"]
        with as_(server, ADMIN) as admin:
            w.admin = admin
            yield w
