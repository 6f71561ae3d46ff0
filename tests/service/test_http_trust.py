"""Tenancy and integrity over HTTP: granted namespaces, checked versions, what unauthenticated
endpoints reveal, the error contract on every endpoint, options that are honoured or refused."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headfleet.heads.types import HeadArrays
from http_server import as_, running

ALICE, BOB, CAROL, ADMIN = "key-alice", "key-bob", "key-carol", "key-admin"
BLANKS = ["\u200b\u200c\u200d\ufeff", " \u2060 ", "\u00ad", "\u3164", "\u2800", "\u0301", "\U000e0041"]


@pytest.fixture(scope="module")
def multi(minilm, tmp_path_factory):
    with running(minilm, tmp_path_factory.mktemp("trust"), api_keys=f"alice:{ALICE},bob:{BOB},carol:{CAROL}",
                 admin_key=ADMIN) as server:
        yield server


def publish(server, tenant: str, name: str, seed: int) -> dict:
    """A head saved straight into the server's registry (what training would publish)."""
    e = server.service.engine
    rng = np.random.default_rng(seed)
    head = HeadArrays("logreg", ["no", "yes"], False, rng.normal(size=(2, e.embedder.dim)).astype(np.float32),
                      np.zeros(2, np.float32))
    return e.registry.save(tenant, name, head, {"parent_fingerprint": e.embedder.fingerprint})


def metric(server, name: str) -> float:
    text = as_(server, ADMIN).get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return 0.0


# --- shared namespaces are granted ----------------------------------------------------------------
def test_a_namespace_is_shared_only_by_the_tenants_it_is_granted_to(multi):
    publish(multi, "alice", "ns-head", 1)
    publish(multi, "bob", "ns-head", 2)
    publish(multi, "carol", "ns-head", 3)
    text = "a sentence sent to a shared namespace, first by alice"
    body = {"texts": [text], "classifiers": ["ns-head"], "namespace": "team"}
    with as_(multi, ALICE) as a, as_(multi, BOB) as b, as_(multi, CAROL) as c, as_(multi, ADMIN) as admin:
        r = a.post("/classify", json=body)
        assert r.status_code == 403 and r.json()["error_type"] == "forbidden", r.text
        assert "not granted" in r.json()["error"]
        r = admin.put("/admin/namespaces/team", json={"members": ["alice", "bob"]})
        assert r.status_code == 200 and r.json()["members"] == ["alice", "bob"], r.text
        assert a.post("/classify", json=body).json()["results"][0]["cache"] == "miss"
        assert b.post("/classify", json=body).json()["results"][0]["cache"] == "memory"  # shared: granted
        r = c.post("/classify", json=body)  # carol named it without a grant: no hit, no answer
        assert r.status_code == 403 and r.json()["error_type"] == "forbidden"
        assert c.post("/classify", json={**body, "namespace": "nosuch"}).json()["error"] == \
            r.json()["error"].replace("'team'", "'nosuch'")  # same words whether it exists or not
        r = c.post("/jobs", json={"source": "docs.jsonl", "classifiers": ["ns-head"], "namespace": "team"})
        assert r.status_code == 403
        assert admin.delete("/admin/namespaces/team/members/bob").status_code == 200
        assert b.post("/classify", json=body).status_code == 403
        assert admin.get("/admin/namespaces").json()["namespaces"]["team"]["members"] == ["alice"]
        assert a.put("/admin/namespaces/mine", json={"members": ["alice"]}).status_code == 403  # admin only


# --- stored versions are checked ------------------------------------------------------------------
def test_a_version_whose_weights_changed_is_refused_by_name_and_the_rest_still_answer(multi):
    good, bad = publish(multi, "alice", "healthy", 4), publish(multi, "alice", "tampered", 5)
    publish(multi, "alice", "truncated", 6)
    reg = multi.service.engine.registry
    path = reg.version_dir("alice", bad) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # same length, other numbers
    path.write_bytes(bytes(data))
    cut = reg.version_dir("alice", reg.resolve("alice", "truncated")) / "weights.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    before = metric(multi, "headfleet_corrupt_versions_total")
    with as_(multi, ALICE) as a:
        r = a.post("/classify", json={"texts": ["some words"], "classifiers": ["healthy", "tampered"]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert set(out["results"][0]["classifications"]) == {"healthy"}
        err = out["errors"]["tampered"]
        assert err["error_type"] == "corrupt_version"
        assert "alice/tampered@1" in err["error"] and "retrain" in err["error"] and "sha256" in err["error"]
        for name in ("tampered", "truncated"):
            r = a.post("/classify", json={"texts": ["some words"], "classifiers": [name]})
            assert r.status_code == 503 and r.json()["error_type"] == "corrupt_version", r.text
            assert f"alice/{name}@1" in r.json()["error"] and "/" + "tmp" not in r.json()["error"]
    with as_(multi, BOB) as b:  # another tenant, untouched
        assert b.post("/classify", json={"texts": ["some words"], "classifiers": ["ns-head"]}).status_code == 200
    assert metric(multi, "headfleet_corrupt_versions_total") >= before + 2
    assert good["weights"]["sha256"]


# --- unauthenticated endpoints reveal nothing -----------------------------------------------------
def test_info_and_health_name_no_server_path_or_address_without_the_admin_key(minilm, tmp_path, redis_server):
    with running(minilm, tmp_path, api_keys=f"alice:{ALICE}", admin_key=ADMIN, redis_url=redis_server.url) as srv:
        anon = httpx.get(f"{srv.url}/info").text
        assert str(minilm.folder) not in anon and str(tmp_path) not in anon and '"folder"' not in anon
        assert json.loads(anon)["backbone"]["name"] == "all-MiniLM-L6-v2"
        assert httpx.get(f"{srv.url}/info", headers={"Authorization": f"Bearer {ADMIN}"}).json()["backbone"][
            "folder"] == str(minilm.folder)
        redis_server.stop()
        health = wait_health(srv.url, "degraded")
        assert str(redis_server.port) not in json.dumps(health) and "127.0.0.1" not in json.dumps(health)


def wait_health(url: str, status: str, timeout: float = 5.0) -> dict:
    """Poll /health (no other traffic) until it says ``status``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        out = httpx.get(f"{url}/health").json()
        if out["status"] == status or time.monotonic() > deadline:
            assert out["status"] == status, out
            return out
        time.sleep(0.2)


def test_health_follows_redis_with_no_traffic_and_outages_are_counted(minilm, tmp_path, redis_server):
    with running(minilm, tmp_path, redis_url=redis_server.url) as srv:
        wait_health(srv.url, "ready")
        redis_server.stop()
        wait_health(srv.url, "degraded")
        redis_server.start()
        wait_health(srv.url, "ready")
        text = httpx.get(f"{srv.url}/metrics").text
        assert "headfleet_redis_outages_total 1.0" in text and "headfleet_redis_up 1.0" in text


def test_without_redis_no_redis_gauge_is_exported(client):
    text = client.get("/metrics").text
    assert "headfleet_redis_up" not in text and "headfleet_redis_outages" not in text
    assert client.get("/metrics").headers["content-type"].count("charset") == 1


# --- one error contract ---------------------------------------------------------------------------
DEEP = b'{"texts": ' + b"[" * 3000 + b"]" * 3000 + b', "classifiers": ["spam"]}'
BODIES = [(DEEP, "nested too deeply"), (b"", "empty"), (b"   ", "empty"), (b"{nope", "not valid JSON"),
          (b'{"texts": ["\\ud83d"], "classifiers": ["spam"]}', "surrogate"), (b"\xff\xfe{}", "not valid JSON")]


@pytest.mark.parametrize("path", ["/classify", "/classifiers", "/jobs", "/embed", "/v1/embeddings"])
@pytest.mark.parametrize("body, says", BODIES, ids=["deep", "empty", "spaces", "malformed", "surrogate", "bytes"])
def test_a_body_that_is_not_json_is_400_invalid_json_everywhere(client, path, body, says):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if path.startswith("/v1/"):
        assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error" and says in err["message"]
    else:
        assert r.json()["error_type"] == "invalid_json" and says in err


def test_lenient_json_types_are_refused(client):
    r = client.post("/embed", json={"inputs": "hello", "truncate": 0})
    assert r.status_code == 422 and "truncate" in r.json()["error"]
    assert client.post("/embed", json={"inputs": "hello", "truncate": False}).status_code == 200


def test_the_openai_client_sees_the_reason(single):
    c = openai.OpenAI(base_url=f"{single.url}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError) as e:
        c.embeddings.create(model="gpt-nope", input="hello")
    assert "gpt-nope" in str(e.value) and e.value.body["code"] == "not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.embeddings.create(model="all-MiniLM-L6-v2", input="\u200b")
    assert "no visible content" in str(e.value) and e.value.body["param"] == "input"


def test_options_lists_every_method_of_the_path(client):
    for path, methods in {"/classifiers": "GET, OPTIONS, POST", "/classifiers/spam": "DELETE, GET, OPTIONS",
                          "/jobs": "GET, OPTIONS, POST", "/jobs/x": "DELETE, GET, OPTIONS"}.items():
        assert client.options(path).headers["allow"] == methods


def test_the_schema_is_served_as_json_with_errors_and_security(client):
    doc = client.get("/schema").json()
    assert doc["openapi"].startswith("3.") and "bearer" in doc["components"]["securitySchemes"]
    post = doc["paths"]["/classify"]["post"]
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(post["responses"]) >= {"200", "400", "401", "404", "413", "422", "429"}
    assert doc["paths"]["/v1/embeddings"]["post"]["responses"]["404"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/OpenAIErrorBody")
    assert set(doc["paths"]["/classifiers"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                                    "multipart/form-data"}
    assert "requestBody" in doc["paths"]["/jobs"]["post"]
    assert doc["paths"]["/health"]["get"]["security"] == [{}]


# --- texts with no visible content, options honoured or refused -----------------------------------
@pytest.mark.parametrize("blank", BLANKS)
def test_a_text_with_no_visible_content_is_refused_everywhere(client, blank):
    for path, body, field in [("/classify", {"texts": ["fine", blank], "classifiers": ["spam"]}, "texts[1]"),
                              ("/embed", {"inputs": ["fine", blank]}, "inputs[1]"),
                              ("/v1/embeddings", {"input": ["fine", blank], "model": "headfleet"}, "input[1]")]:
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        msg = r.json()["error"]["message"] if path.startswith("/v1") else r.json()["error"]
        assert msg.startswith(f"{field} is empty or has no visible content"), msg


def test_embed_options_are_honoured_or_refused_by_name(client):
    r = client.post("/embed", json={"inputs": "hello", "prompt_name": "query"})
    assert r.status_code == 422 and "prompt_name 'query'" in r.json()["error"]
    r = client.post("/embed", json={"inputs": "hello", "dimensions": 128})
    assert r.status_code == 422 and "dimensions" in r.json()["error"]
    r = client.post("/v1/embeddings", json={"input": "hello", "model": "headfleet", "user": "u-1"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "user"
