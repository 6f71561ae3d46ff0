"""Shadows and A/B experiments through HTTP, as a tenant drives them: the README's worked example
(create, classify with a unit, post outcomes, read the statistics, promote), the 4xx contract and
tenant isolation, and the CLI commands that read the same state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scipy import stats as sps

from http_server import as_, running, wait_for_job

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"
SPAM = [{"text": t, "label": lab} for t, lab in [
    ("win a free prize now, text CLAIM", "spam"), ("urgent! your account won cash, call now", "spam"),
    ("free entry to win a holiday, reply YES", "spam"), ("claim your free ringtone today", "spam"),
    ("are we still on for lunch?", "ham"), ("see you at the station at six", "ham"),
    ("can you send me the notes from class", "ham"), ("mum says dinner is at eight", "ham")] * 3]
TEXTS = ["free cash prize, call now", "lunch at six?", "claim the ringtone", "notes from class please"]


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    with running(minilm, tmp_path_factory.mktemp("exp"), api_keys=f"alice:{ALICE},bob:{BOB}") as s:
        yield s


@pytest.fixture(scope="module")
def alice(server):
    with as_(server, ALICE) as c:
        for kind in ("logreg", "mlp"):  # v1, then v2 (latest moves to it; moved back below)
            r = c.post("/classifiers", json={"name": "spam", "examples": SPAM, "kind": kind})
            assert r.status_code == 202, r.text
            assert wait_for_job(c, r.json()["job"]["id"])["state"] == "succeeded"
        assert c.put("/classifiers/spam/aliases/latest", json={"version": 1}).status_code == 200
        assert c.put("/classifiers/spam/aliases/candidate", json={"version": 2}).status_code == 200
        yield c


def test_an_experiment_from_creation_to_promotion(alice, server, tmp_path):
    r = alice.post("/experiments", json={"name": "mlp head", "classifier": "spam", "control": "latest",
                                         "treatment": "candidate", "split": 0.5, "metric": "conversion",
                                         "min_samples": 20, "guardrails": {"p99_ms": 60000, "error_rate": 0.5},
                                         "sequential": True})
    assert r.status_code == 201, r.text
    exp = r.json()
    assert r.headers["location"] == f"/experiments/{exp['id']}"
    assert (exp["arms"]["control"]["version"], exp["arms"]["treatment"]["version"]) == (1, 2)
    assert exp["config"]["control"] == {"ref": "latest", "version": 1} and exp["state"] == "running"
    arms = {}
    for i in range(120):  # enough units that the always-valid p detects the planted lift for any experiment id
        unit = f"user-{i}"
        # the unit in the body or the X-Unit-Id header: the same arm either way, every time
        a = alice.post("/classify", json={"texts": TEXTS[:1], "classifiers": ["spam"], "unit": unit}).json()
        b = alice.post("/classify", json={"texts": TEXTS[:1], "classifiers": ["spam"]},
                       headers={"X-Unit-Id": unit}).json()
        ea, eb = (x["results"][0]["classifications"]["spam"] for x in (a, b))
        assert ea["experiment"] == eb["experiment"] and ea["experiment"]["id"] == exp["id"]
        assert ea["version"] == ea["experiment"]["version"] == (2 if ea["experiment"]["arm"] == "treatment" else 1)
        arms[unit] = ea["experiment"]["arm"]
    assert set(arms.values()) == {"control", "treatment"}
    # treatment units convert, control units mostly do not
    items = [{"unit": u, "value": 1.0 if (a == "treatment" and i % 7) or i % 5 == 0 else 0.0, "id": f"o{i}"}
             for i, (u, a) in enumerate(arms.items())]
    r = alice.post(f"/experiments/{exp['id']}/outcomes", json={"items": items + [{"unit": "stranger", "value": 1}]})
    assert r.status_code == 200
    assert r.json()["accepted"] == len(items) and r.json()["refused"][0]["index"] == len(items)
    report = alice.get(f"/experiments/{exp['id']}").json()
    t = [it["value"] for it in items if arms[it["unit"]] == "treatment"]
    c = [it["value"] for it in items if arms[it["unit"]] == "control"]
    ref = sps.ttest_ind(t, c, equal_var=False)
    assert report["welch"]["t"] == pytest.approx(ref.statistic) and report["welch"]["p"] == pytest.approx(ref.pvalue)
    assert report["guardrails"]["treatment"]["requests"] == 2 * len(t)  # two requests per unit
    assert report["recommendation"] == "promote", report["recommendation_reason"]
    # the CLI reads the same state, without a backbone
    out = subprocess.run([sys.executable, "-m", "headfleet.service.cli", "experiments", exp["id"], "--json",
                          "--tenant", "alice", "--data-dir", str(server.service.settings.data_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["welch"] == report["welch"]
    stopped = alice.post(f"/experiments/{exp['id']}/stop", json={"decision": "promote"})
    assert stopped.status_code == 200 and stopped.json()["decision"] == "promote"
    assert alice.get("/classifiers/spam").json()["aliases"]["latest"] == 2
    assert alice.post(f"/experiments/{exp['id']}/stop", json={"decision": "rollback"}).status_code == 409
    listing = alice.get("/experiments", params={"limit": 10}).json()
    assert [e["id"] for e in listing["experiments"]] == [exp["id"]] and listing["next"] is None
    alice.put("/classifiers/spam/aliases/latest", json={"version": 1})  # back for the other tests


def test_bad_bodies_are_4xx_and_tenants_see_only_their_experiments(alice, server):
    cases = [({"classifier": "spam", "control": 1, "treatment": 2, "split": 1.5}, 422),
             ({"classifier": "spam", "control": 1, "treatment": 2, "splitt": 0.5}, 422),
             ({"classifier": "spam", "control": 1, "treatment": 9}, 404),
             ({"classifier": "ghost", "control": 1, "treatment": 2}, 404),
             ({"classifier": "spam", "control": [1], "treatment": 2}, 422)]
    for body, status in cases:
        r = alice.post("/experiments", json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) >= {"error", "error_type"}
    r = alice.post("/classify", json={"texts": ["x"], "classifiers": ["spam"], "unit": "a"}, headers={"X-Unit-Id": "b"})
    assert r.status_code == 422 and "unit" in r.json()["error"]
    exp = alice.post("/experiments", json={"classifier": "spam", "control": 1, "treatment": 2}).json()
    with as_(server, BOB) as bob:
        for method, path, body in (("GET", f"/experiments/{exp['id']}", None),
                                   ("POST", f"/experiments/{exp['id']}/outcomes", {"items": [{"unit": "u", "value": 1}]}),
                                   ("POST", f"/experiments/{exp['id']}/stop", {"decision": "promote"})):
            r = bob.request(method, path, json=body)
            assert r.status_code == 404 and r.json()["error_type"] == "not_found"
        assert bob.get("/experiments").json()["experiments"] == []
        assert bob.get("/classifiers/spam/shadow").status_code == 404
    assert alice.post(f"/experiments/{exp['id']}/stop", json={"decision": "rollback"}).json()["decision"] == "rollback"
    assert alice.get("/classifiers/spam").json()["aliases"]["latest"] == 1


def test_a_shadow_through_http_changes_no_answer_and_reports_agreement(alice, server):
    plain = alice.post("/classify", json={"texts": TEXTS, "classifiers": ["spam"]}).json()
    r = alice.put("/classifiers/spam/shadow", json={"version": "candidate"})
    assert r.status_code == 200 and r.json()["shadow"] == "spam@2"
    assert alice.put("/classifiers/spam/shadow", json={"version": 2, "sample": 0.5}).status_code == 422
    assert alice.put("/classifiers/spam/shadow", json={"version": 1}).status_code == 422
    shadowed = alice.post("/classify", json={"texts": TEXTS, "classifiers": ["spam"]}).json()
    assert [x["classifications"] for x in shadowed["results"]] == [x["classifications"] for x in plain["results"]]
    debug = alice.post("/classify", json={"texts": TEXTS, "classifiers": ["spam"], "debug": True}).json()
    direct = alice.post("/classify", json={"texts": TEXTS, "classifiers": ["spam@2"]}).json()
    for x, y in zip(debug["results"], direct["results"]):  # one rounding step (1e-6) apart at most
        assert x["classifications"]["spam"]["shadow"]["scores"] == pytest.approx(y["classifications"]["spam@2"]["scores"],
                                                                                   abs=2e-6)
    report = alice.get("/classifiers/spam/shadow").json()
    assert report["live"] == "spam@1" and report["n"] == 2 * len(TEXTS)
    assert sum(sum(row.values()) for row in report["flips"].values()) == report["n"]
    out = subprocess.run([sys.executable, "-m", "headfleet.service.cli", "shadow", "spam", "--tenant", "alice",
                          "--data-dir", str(server.service.settings.data_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "spam@1 (live) vs spam@2 (shadow)" in out.stdout, out.stderr
    assert alice.delete("/classifiers/spam/shadow").json()["n"] == 2 * len(TEXTS)
    assert alice.get("/classifiers/spam/shadow").status_code == 404
