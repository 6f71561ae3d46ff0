"""Monitoring through HTTP: feedback, canary, settings, windows, and the retrain trigger.

The three-phase test drives a spam classifier trained on SMS messages (../shared/data/sms_spam.csv)
through the traffic a production team sees, and checks that only the conjunction of drift and a
canary accuracy drop starts a retrain:
  1. in-distribution SMS with correct feedback      -> no drift, no trigger
  2. a benign shift: office chat the head calls ham -> drift flagged, canary fine, no trigger
  3. a concept shift: invoice fraud the head calls ham but users label spam
                                                     -> drift and accuracy drop -> a retrain job
     -> a candidate (latest unmoved) whose canary accuracy beats the live version's.
"""

from __future__ import annotations

import csv
import itertools

import httpx
import pytest

from http_server import as_, running, wait_for_job

SUBJECTS = ["the deploy", "the quarterly report", "the design review", "our sprint planning", "the database migration",
            "the onboarding doc", "the budget sheet", "the client demo", "the release notes", "the test plan",
            "the hiring loop", "the incident review", "the roadmap", "the offsite agenda", "the vendor contract",
            "the security audit", "the style guide", "the analytics dashboard", "the beta feedback", "the API docs"]
OFFICE = ["Can you review {s} before tomorrow's standup?", "I pushed a fix for {s}, please take a look when you can",
          "Reminder: {s} moved to 3pm in room B", "Notes from {s} are in the shared folder", "Who owns {s} this week?",
          "{S} is blocked on the API change, any ideas?", "Thanks for the help with {s} yesterday",
          "Let's sync on {s} after lunch", "I added comments to {s}", "Heads up, {s} slipped to Friday"]
VENDORS = ["Northwind Logistics", "Acme Supplies", "Globex Consulting", "Initech Services", "Umbrella Freight",
           "Stark Components", "Wayne Catering", "Hooli Cloud", "Vandelay Imports", "Soylent Foods",
           "Contoso Print", "Fabrikam Parts", "Tailspin Travel", "Wingtip Hardware", "Litware Licensing",
           "Adventure Works", "Proseware Media", "Lucerne Publishing", "Margie Transport", "Coho Vineyard"]
FRAUD = ["Hi, {v} updated their bank details, please pay the outstanding invoice to the new account today",
         "The director asked me to settle the {v} invoice before 5pm, use the account in this message",
         "Please process the {v} invoice using the revised bank details below",
         "{v} accounts team here: our remittance account changed, kindly redirect this month's transfer",
         "Quick favour: can you pay {v} today? I'm in meetings, the new account number is below",
         "Finance update: {v} payments now go to a different account, please update before the next run",
         "Following our call, {v} needs the deposit moved to their new bank by end of day",
         "Per the director, approve the {v} wire today and keep it confidential until the deal closes",
         "{v} sent a corrected invoice with new payment details, please use those instead",
         "Reminder from {v}: pay to the updated account only, the old one is closed"]
WINDOW = 200


def office() -> list[str]:
    return [t.format(s=s, S=s[0].upper() + s[1:]) for t, s in itertools.product(OFFICE, SUBJECTS)]


def fraud() -> list[str]:
    return [t.format(v=v) for t, v in itertools.product(FRAUD, VENDORS)]


@pytest.fixture(scope="module")
def sms(sms_spam_path) -> list[tuple[str, str]]:
    with open(sms_spam_path, newline="", encoding="utf-8") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    with running(minilm, tmp_path_factory.mktemp("monitoring"), examples=False, monitor_interval_s=0.2) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def train(http: httpx.Client, name: str, rows: list[tuple[str, str]]) -> dict:
    r = http.post("/classifiers", json={"name": name, "examples": [{"text": t, "label": lab} for t, lab in rows]})
    assert r.status_code == 202, r.text
    job = wait_for_job(http, r.json()["job"]["id"])
    assert job["state"] == "succeeded", job
    return job


def send(http: httpx.Client, name: str, texts: list[str], labels: list[str]) -> float:
    """Send the feedback for ``texts``, then classify them in requests of 50; returns how often the
    head agreed. Feedback first: a window is scored on the canary (core + feedback) when it closes,
    and it closes at the monitor's next drain after its last text, which could come before feedback
    sent after the last request (a race the CI run of 30 Nov lost once)."""
    r = http.post("/feedback", json={"classifier": name, "items": [{"text": t, "label": lab}
                                                                   for t, lab in zip(texts, labels)]})
    assert r.status_code == 200 and r.json() == {"accepted": len(texts)}, r.text
    agree = 0
    for i in range(0, len(texts), 50):
        part = texts[i:i + 50]
        r = http.post("/classify", json={"texts": part, "classifiers": [name]})
        assert r.status_code == 200, r.text
        agree += sum(row["classifications"][name]["label"] == lab
                     for row, lab in zip(r.json()["results"], labels[i:i + 50]))
    return agree / len(texts)


def test_only_drift_and_an_accuracy_drop_together_make_a_candidate(http, sms, server, capsys):
    train(http, "spam", sms[:400])
    r = http.put("/classifiers/spam/canary", json={"examples": [{"text": t, "label": lab} for t, lab in sms[400:550]]})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == 150 and set(r.json()["per_label"]) == {"ham", "spam"}
    r = http.put("/classifiers/spam/monitor", json={"window_texts": WINDOW, "consecutive": 1, "auto_retrain": True})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["window_texts"] == WINDOW and r.json()["settings"]["psi"] == 0.1  # the rest: defaults

    # 1. in-distribution traffic, labelled correctly: no drift, no trigger
    phase1 = sms[600:600 + WINDOW]
    send(http, "spam", [t for t, _ in phase1], [lab for _, lab in phase1])
    report = http.get("/classifiers/spam/monitor").json()
    assert report["version"] == 1 and len(report["windows"]) == 1
    w = report["windows"][0]
    assert w["texts"] == WINDOW and w["drift"] is False and w["accuracy_drop"] is False, w
    assert w["canary_accuracy"] > 0.9 and report["retrain"]["triggered"] is False

    # 2. benign shift: another kind of text, which the head gets right -> drift alone, no trigger
    texts = office()
    agreed = send(http, "spam", texts, ["ham"] * len(texts))
    assert agreed > 0.9  # the premise of a benign shift
    report = http.get("/classifiers/spam/monitor").json()
    w = report["windows"][1]
    assert w["drift"] is True and w["domain_auc"] > 0.55 and w["accuracy_drop"] is False, w
    assert report["retrain"]["triggered"] is False
    assert [a["kind"] for a in report["alerts"]] == ["drift"]

    # 3. concept shift: a new kind of text that users label differently from the head
    texts = fraud()
    agreed = send(http, "spam", texts, ["spam"] * len(texts))
    assert agreed < 0.5  # the premise: the head calls most of it ham
    report = http.get("/classifiers/spam/monitor").json()
    w = report["windows"][2]
    assert w["drift"] is True and w["accuracy_drop"] is True, w
    assert w["canary_accuracy"] < report["windows"][1]["canary_accuracy"] - 0.05
    retrain = report["retrain"]
    assert retrain["triggered"] is True and retrain["job"], retrain
    assert {"drift", "accuracy_drop", "retrain"} <= {a["kind"] for a in report["alerts"]}
    job = wait_for_job(http, retrain["job"])
    assert job["state"] == "succeeded" and job["type"] == "retrain", job

    report = http.get("/classifiers/spam/monitor").json()
    candidate = report["retrain"]["candidate"]
    assert candidate == "spam@2"
    shown = http.get("/classifiers/spam").json()
    assert shown["aliases"] == {"latest": 1, "candidate": 2}  # never promoted automatically
    assert http.post("/classify", json={"texts": ["hi"], "classifiers": ["spam"]}).json()[
        "results"][0]["classifications"]["spam"]["version"] == 1
    review = http.get("/classifiers/spam@candidate").json()["classifier"]
    assert review["version"] == 2
    made = job["result"]["retrain"]
    assert made["canary_accuracy"] > made["live_canary_accuracy"] == w["canary_accuracy"]
    assert made["trigger"]["windows"][0]["texts"] == WINDOW
    # the candidate still labels the live version's own holdout (the old data) right: it learned, not forgot
    assert 0.9 <= made["previous_holdout_accuracy"] <= 1.0, made
    # the candidate learned the new kind of text
    r = http.post("/classify", json={"texts": fraud()[:20], "classifiers": ["spam@candidate"]}).json()
    assert sum(row["classifications"]["spam@candidate"]["label"] == "spam" for row in r["results"]) >= 15

    # a version a training job makes names its canary as the monitor's candidate does: the set as
    # scored, frozen core plus rolling feedback (not the core alone)
    r = http.post("/classifiers", json={"name": "spam", "candidate": True,
                                        "examples": [{"text": t, "label": lab} for t, lab in sms[:400]]})
    assert r.status_code == 202, r.text
    assert wait_for_job(http, r.json()["job"]["id"])["state"] == "succeeded"
    by_job = http.get("/classifiers/spam@3").json()["classifier"]
    assert review["canary_hash"] and by_job["canary_hash"] == review["canary_hash"]
    core = http.put("/classifiers/spam/canary", json={"examples": [{"text": t, "label": lab}
                                                                   for t, lab in sms[400:550]]}).json()
    assert core["hash"] != review["canary_hash"]  # the rolling part is in the hash

    # the same report on the command line and a fleet-level count on /metrics
    from headfleet.service import cli

    assert cli.main(["monitor", "--data-dir", str(server.service.settings.data_dir), "spam"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("20")]
    assert len(rows) == 3 and "DRIFT" not in rows[0] and "DRIFT" in rows[1] and "DROP" in rows[2], table
    assert any(line.startswith("retrain succeeded") and "spam@2" in line for line in table), table
    metrics = http.get("/metrics").text
    assert "headfleet_monitor_retrains_total 1.0" in metrics and "headfleet_monitor_classifiers 1.0" in metrics


def test_feedback_and_canary_refuse_bad_input_whole(http, sms):
    if http.get("/classifiers/spam").status_code == 404:
        train(http, "spam", sms[:400])
    before = http.get("/classifiers/spam/canary").json()
    r = http.post("/feedback", json={"classifier": "spam", "items": [{"text": "ok", "label": "ham"},
                                                                     {"text": "hmm", "label": "urgent"}]})
    assert r.status_code == 422 and "items[1]" in r.json()["error"] and "'urgent'" in r.json()["error"]
    assert http.get("/classifiers/spam/canary").json() == before  # nothing of the body was stored
    r = http.post("/feedback", json={"classifier": "nope", "items": [{"text": "ok", "label": "ham"}]})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = http.post("/feedback", json={"classifier": "spam@7", "items": [{"text": "  ", "label": "ham"}]})
    assert r.status_code == 422 and "items[0]" in r.json()["error"]
    r = http.put("/classifiers/spam/canary", json={"examples": []})
    assert r.status_code == 422
    r = http.put("/classifiers/spam/canary", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_json"
    for bad in ({"psi": "high"}, {"domain_auc": 0.3}, {"window_texts": 2.5}, {"consecutive": 0},
                {"webhook": "ftp://x"}, {"auto_retrain": 1}, {"nonsense": 1}):
        r = http.put("/classifiers/spam/monitor", json=bad)
        assert r.status_code in (400, 422) and set(r.json()) >= {"error", "error_type"}, (bad, r.text)
    csv_body = "text,label\nwin a prize now,spam\nsee you at lunch,ham\n"
    r = http.put("/classifiers/spam/canary", files={"file": ("canary.csv", csv_body, "text/csv")})
    assert r.status_code == 200 and r.json()["size"] == 2 and r.json()["per_label"] == {"ham": 1, "spam": 1}
    r2 = http.put("/classifiers/spam/canary", json={"examples": [{"text": "win a prize now", "label": "spam"},
                                                                 {"text": "see you at lunch", "label": "ham"}]})
    assert r2.json()["hash"] == r.json()["hash"]  # the same examples hash alike from CSV and JSON


def test_tenants_never_see_each_others_monitoring(minilm, tmp_path, sms):
    keys = "alpha:key-alpha,beta:key-beta"
    with running(minilm, tmp_path / "d", api_keys=keys, examples=False, monitor_interval_s=0.2) as server:
        with as_(server, "key-alpha") as a, as_(server, "key-beta") as b:
            train(a, "spam", sms[:120])
            assert a.put("/classifiers/spam/monitor", json={"window_texts": 10}).status_code == 200
            assert a.post("/feedback", json={"classifier": "spam", "items": [
                {"text": "private alpha text", "label": "ham"}]}).status_code == 200
            for call in (lambda: b.get("/classifiers/spam/monitor"), lambda: b.get("/classifiers/spam/canary"),
                         lambda: b.put("/classifiers/spam/monitor", json={"psi": 0.2}),
                         lambda: b.post("/feedback", json={"classifier": "spam", "items": [
                             {"text": "x", "label": "ham"}]})):
                r = call()
                assert r.status_code == 404, r.text
            # beta's own classifier of the same name has none of alpha's state
            train(b, "spam", sms[:120])
            assert b.get("/classifiers/spam/canary").status_code == 404
            assert b.get("/classifiers/spam/monitor").json()["enabled"] is False
            assert b.post("/feedback", json={"classifier": "spam", "items": [
                {"text": "beta's own text", "label": "spam"}]}).status_code == 200
            assert b.get("/classifiers/spam/canary").json()["rolling"] == 1
            # only /classify traffic counts: alpha's texts fill a window, beta's do not show in it
            texts = [t for t, _ in sms[700:710]]
            assert a.post("/classify", json={"texts": texts, "classifiers": ["spam"]}).status_code == 200
            assert b.post("/classify", json={"texts": texts, "classifiers": ["spam"]}).status_code == 200
            assert [w["texts"] for w in a.get("/classifiers/spam/monitor").json()["windows"]] == [10]
            # deleting the classifier deletes its monitoring state
            assert a.delete("/classifiers/spam").status_code == 200
            assert not server.service.monitor.store.keys("alpha")
            assert server.service.monitor.store.keys("beta")
