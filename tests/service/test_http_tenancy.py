"""API keys, tenant isolation, classifier management and the training-job flow over HTTP."""

from __future__ import annotations


import httpx
import pytest

from headfleet.engine.examples import EXAMPLES
from http_server import as_, running, wait_for_job

ALICE, BOB, ADMIN = "key-alice", "key-bob", "key-admin"

SPAM_EXAMPLES = (
    [{"text": t, "label": "spam"} for t in [
        "WIN a free cruise, reply YES now", "Claim your cash prize today, click the link",
        "You have been selected for a free gift card", "Cheap meds online, no prescription needed",
        "URGENT: your account wins 1000 dollars, call now", "Free entry in our weekly prize draw, text WIN"]]
    + [{"text": t, "label": "ham"} for t in [
        "Are we still on for lunch tomorrow?", "I'll be home late, start dinner without me",
        "Can you send me the slides from the meeting", "Happy birthday! Hope you have a great day",
        "The train is delayed by ten minutes", "Did you feed the cat this morning?"]]
)


@pytest.fixture(scope="module")
def multi(minilm, tmp_path_factory):
    with running(minilm, tmp_path_factory.mktemp("multi"), api_keys=f"alice:{ALICE},bob:{BOB}",
                 admin_key=ADMIN) as server:
        yield server


@pytest.fixture(scope="module")
def alice_spam(multi):
    with as_(multi, ALICE) as c:
        r = c.post("/classifiers", json={"name": "spam", "examples": SPAM_EXAMPLES})
        assert r.status_code == 202, r.text
        job = r.json()["job"]
        assert r.headers["location"] == f"/jobs/{job['id']}"
        assert job["state"] in ("queued", "running", "succeeded")
        done = wait_for_job(c, job["id"])
        assert done["state"] == "succeeded", done
        return done


def test_no_key_or_a_wrong_key_is_401(multi):
    with as_(multi, None) as c:
        r = c.post("/classify", json={"texts": ["x"], "classifiers": ["spam"]})
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
    with as_(multi, "not-a-key") as c:
        assert c.get("/classifiers").status_code == 401
    r = httpx.get(multi.url + "/classifiers", headers={"X-API-Key": ALICE})
    assert r.status_code == 200  # the other header works too


def test_training_job_end_to_end(multi, alice_spam):
    assert alice_spam["result"]["id"] == "spam@1"
    assert alice_spam["progress"] == {"embedded": len(SPAM_EXAMPLES), "total": len(SPAM_EXAMPLES)}
    assert alice_spam["result"]["metrics"]["n_train"] > 0
    with as_(multi, ALICE) as c:
        out = c.post("/classify", json={"texts": ["Claim your free prize now, click here", "See you at lunch"],
                                        "classifiers": ["spam"]}).json()
        assert [r["classifications"]["spam"]["label"] for r in out["results"]] == ["spam", "ham"]
        listed = c.get("/classifiers").json()["classifiers"]
        assert [x["name"] for x in listed] == ["spam"]
        shown = c.get("/classifiers/spam").json()
        assert shown["versions"] == [1] and shown["aliases"]["latest"] == 1
        metrics = shown["classifier"]["metrics"]
        assert metrics == alice_spam["result"]["metrics"]  # the version shown is the one the job trained
        # six clear examples of each class: the held-out ones are all labelled right
        assert metrics["n_holdout"] >= 2 and metrics["accuracy"] == 1.0, metrics
        assert shown["classifier"]["validation"]["n_examples"] == len(SPAM_EXAMPLES)
        assert any(j["id"] == alice_spam["id"] for j in c.get("/jobs").json()["jobs"])


def test_tenant_b_cannot_see_or_use_a_classifier_of_tenant_a(multi, alice_spam):
    with as_(multi, BOB) as c:
        r = c.post("/classify", json={"texts": ["x"], "classifiers": ["spam"]})
        unknown = c.post("/classify", json={"texts": ["x"], "classifiers": ["never-made"]})
        assert r.status_code == unknown.status_code == 404
        assert r.json()["error"] == "no classifier named 'spam'"  # the same words as for a missing one
        assert c.get("/classifiers").json() == {"classifiers": []}
        assert c.get("/classifiers/spam").status_code == 404
        assert c.delete("/classifiers/spam").status_code == 404
        assert c.put("/classifiers/spam/aliases/prod", json={"version": 1}).status_code == 404
        assert c.get(f"/jobs/{alice_spam['id']}").status_code == 404
        assert c.get("/jobs").json() == {"jobs": []}
    with as_(multi, ALICE) as c:  # and Alice still has it
        assert c.post("/classify", json={"texts": ["x"], "classifiers": ["spam"]}).status_code == 200


def test_tenant_b_never_hits_tenant_a_cache_nor_sees_its_stats(multi, alice_spam):
    text = "a message only alice has sent so far"
    with as_(multi, BOB) as c:
        r = c.post("/classifiers", json={"name": "spam", "examples": SPAM_EXAMPLES})
        assert wait_for_job(c, r.json()["job"]["id"])["state"] == "succeeded"
        bob_before = c.get("/stats").json()
    with as_(multi, ALICE) as c:
        out = c.post("/classify", json={"texts": [text], "classifiers": ["spam"]}).json()
        assert out["cache"]["computed"] == 1
        again = c.post("/classify", json={"texts": [text], "classifiers": ["spam"]}).json()
        assert again["results"][0]["cache"] == "memory"
        alice_stats = c.get("/stats").json()
    with as_(multi, BOB) as c:
        bob_mid = c.get("/stats").json()
        assert bob_mid["since_start"] == bob_before["since_start"]  # Alice's traffic is not in Bob's figures
        out = c.post("/classify", json={"texts": [text], "classifiers": ["spam"]}).json()
        assert out["results"][0]["cache"] == "miss" and out["cache"]["computed"] == 1
        bob_after = c.get("/stats").json()
    assert bob_after["tenant"] == "bob" and alice_stats["tenant"] == "alice"
    assert bob_after["since_start"]["lookups"] - bob_before["since_start"]["lookups"] == 1
    assert sum(bob_after["since_start"]["hits"].values()) == sum(bob_before["since_start"]["hits"].values())
    assert alice_stats["since_start"]["hits"]["memory"] >= 1


def test_training_data_refusals_are_422_before_any_job(multi):
    with as_(multi, ALICE) as c:
        one_class = [{"text": f"text {i}", "label": "a"} for i in range(6)]
        r = c.post("/classifiers", json={"name": "bad", "examples": one_class})
        assert r.status_code == 422 and r.json()["error_type"] == "training_data_error"
        assert "one class" in r.json()["error"]
        r = c.post("/classifiers", json={"name": "bad", "examples": [{"text": "x"}]})
        assert r.status_code == 422 and "'label'" in r.json()["error"]
        r = c.post("/classifiers", json={"name": "../bad", "examples": SPAM_EXAMPLES})
        assert r.status_code == 422
        r = c.post("/classifiers", json={"name": "bad", "examples": SPAM_EXAMPLES, "kind": "forest"})
        assert r.status_code == 422
        assert all(j["classifier"] != "bad" for j in c.get("/jobs").json()["jobs"])


def test_upload_a_csv_then_move_an_alias_then_delete(multi):
    csv_text = "text,label\n" + "".join(f"\"{e['text']}\",{e['label']}\n" for e in SPAM_EXAMPLES)
    with as_(multi, ALICE) as c:
        r = c.post("/classifiers", data={"name": "uploaded"}, files={"file": ("spam.csv", csv_text, "text/csv")})
        assert r.status_code == 202, r.text
        assert wait_for_job(c, r.json()["job"]["id"])["result"]["id"] == "uploaded@1"
        r = c.post("/classifiers", data={"name": "uploaded", "kind": "mlp"},
                   files={"file": ("spam.jsonl", "".join(
                       f'{{"text": "{e["text"]}", "label": "{e["label"]}"}}\n' for e in SPAM_EXAMPLES))})
        job = wait_for_job(c, r.json()["job"]["id"])
        assert job["result"]["id"] == "uploaded@2"
        # the re-train embedded nothing: every text was in the tenant's cache
        assert job["result"]["training_cache"]["computed"] == 0
        r = c.put("/classifiers/uploaded/aliases/prod", json={"version": 1})
        assert r.status_code == 200 and r.json()["aliases"]["prod"] == 1
        out = c.post("/classify", json={"texts": ["hello"], "classifiers": ["uploaded@prod", "uploaded"]}).json()
        got = out["results"][0]["classifications"]
        assert got["uploaded@prod"]["version"] == 1 and got["uploaded"]["version"] == 2
        r = c.put("/classifiers/uploaded/aliases/prod", json={"version": 9})
        assert r.status_code == 404
        r = c.post("/classifiers", data={"name": "x"}, files={"file": ("data.txt", "a,b\n")})
        assert r.status_code == 422 and "unsupported file type" in r.json()["error"]
        r = c.post("/classifiers", files={"file": ("spam.csv", csv_text, "text/csv")})  # no name field
        assert r.status_code == 422 and r.json()["error"].startswith("the multipart form needs a 'name' field")
        assert c.delete("/classifiers/uploaded").status_code == 200
        r = c.post("/classify", json={"texts": ["hello"], "classifiers": ["uploaded@prod"]})
        assert r.status_code == 404


def test_admin_manages_keys_and_others_cannot(multi):
    with as_(multi, ALICE) as c:
        assert c.post("/admin/tenants/carol/keys").status_code == 403
        assert c.get("/metrics").status_code == 403  # operator data is the admin's
    with as_(multi, ADMIN) as admin:
        created = admin.post("/admin/tenants/carol/keys")
        assert created.status_code == 201
        key = created.json()["key"]
        assert "carol" in admin.get("/admin/tenants").json()["tenants"]
        assert admin.get("/metrics").status_code == 200
        assert "alice" in admin.get("/admin/stats").json()["tenants"]
    with as_(multi, key) as carol:
        assert carol.get("/classifiers").json() == {"classifiers": []}
        assert carol.get("/stats").json()["tenant"] == "carol"
    with as_(multi, ADMIN) as admin:
        assert admin.delete(f"/admin/keys/{created.json()['key_id']}").status_code == 200
    with as_(multi, key) as carol:
        assert carol.get("/classifiers").status_code == 401
    stored = (multi.service.keys.path).read_text()
    assert key not in stored  # only digests are kept


def test_single_tenant_mode_needs_no_key(client):
    assert set(EXAMPLES) <= {c["name"] for c in client.get("/classifiers").json()["classifiers"]}
    assert client.get("/info").json()["tenancy"] == "single"
