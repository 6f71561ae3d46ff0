"""POST /classify and the read-only endpoints, driven through a real HTTP client."""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headfleet.engine.examples import DEMO_TEXTS

CLASSIFIERS = ["spam", "urgency@1", "sentiment@latest"]


def test_several_classifiers_in_one_call(client):
    r = client.post("/classify", json={"texts": DEMO_TEXTS, "classifiers": CLASSIFIERS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["index"] for x in out["results"]] == list(range(len(DEMO_TEXTS)))
    labels = [{ref: c["label"] for ref, c in x["classifications"].items()} for x in out["results"]]
    assert labels[0]["spam"] == "spam"
    assert labels[1]["urgency@1"] == "urgent"
    assert labels[2]["sentiment@latest"] == "positive"
    assert labels[3]["spam"] == "ham"
    for x in out["results"]:
        assert set(x["classifications"]) == set(CLASSIFIERS)
        for c in x["classifications"].values():
            assert c["version"] == 1 and c["classifier"].endswith("@1")
            assert abs(sum(c["scores"].values()) - 1) < 1e-4
            assert c["label"] == max(c["scores"], key=c["scores"].get)
    assert set(out["timing_ms"]) >= {"adapter_load", "cache", "queue", "embed", "heads", "total"}
    assert out["timing_ms"]["adapter_load"] == 0  # no LoRA classifier: no adapter read


def test_repeat_is_served_from_memory_and_the_report_says_so(client):
    texts = ["a brand new sentence for the cache report", "and a second one, never seen before"]
    first = client.post("/classify", json={"texts": texts, "classifiers": ["spam", "urgency"]}).json()
    assert first["cache"] == {"hits": {"memory": 0, "local": 0, "redis": 0}, "misses": 2, "computed": 2}
    assert [x["cache"] for x in first["results"]] == ["miss", "miss"]
    again = client.post("/classify", json={"texts": texts + texts[:1], "classifiers": ["sentiment"]}).json()
    assert again["cache"] == {"hits": {"memory": 3, "local": 0, "redis": 0}, "misses": 0, "computed": 0}
    assert again["timing_ms"]["queue"] == 0 and again["timing_ms"]["embed"] == 0


def test_a_text_repeated_in_one_request_is_embedded_once(client):
    t = "the same words twice in one request"
    out = client.post("/classify", json={"texts": [t, t, t], "classifiers": ["spam"]}).json()
    assert out["cache"]["misses"] == 3 and out["cache"]["computed"] == 1
    scores = [x["classifications"]["spam"]["scores"] for x in out["results"]]
    assert scores[0] == scores[1] == scores[2]


@pytest.mark.parametrize("body, status, error_type, says", [
    (b'{"texts": ["a"', 400, "invalid_json", "not valid JSON"),
    (b'{"texts": "just one", "classifiers": ["spam"]}', 422, "validation_error", "Expected `array`, got `str`"),
    (b'{"texts": [1, 2], "classifiers": ["spam"]}', 422, "validation_error", "Expected `str`"),
    (b'{"texts": ["a"], "classifier": ["spam"]}', 422, "validation_error", "unknown field `classifier`"),
    (b'{"texts": ["a"]}', 422, "validation_error", "classifiers"),
    (b'{"texts": [], "classifiers": ["spam"]}', 422, "validation_error", "at least one text"),
    (b'{"texts": ["  "], "classifiers": ["spam"]}', 422, "validation_error", "texts[0] is empty"),
    (b'{"texts": ["a"], "classifiers": []}', 422, "validation_error", "at least one classifier"),
    (b'{"texts": ["a"], "classifiers": ["nope"]}', 404, "not_found", "no classifier named 'nope'"),
    (b'{"texts": ["a"], "classifiers": ["spam@7"]}', 404, "not_found", "7"),
    (b'{"texts": ["a"], "classifiers": ["../etc"]}', 422, "validation_error", "classifier name"),
])
def test_bad_requests_get_a_clear_error_body(client, body, status, error_type, says):
    r = client.post("/classify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"}
    assert err["error_type"] == error_type
    assert says in err["error"]


def test_unknown_route_and_method_use_the_same_error_body(client):
    r = client.get("/nothing-here")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = client.put("/classify", json={})
    assert r.status_code == 405 and r.json() == {"error": "PUT is not allowed on /classify",
                                                 "error_type": "method_not_allowed"}


def test_each_limit_answers_with_the_limit_in_the_message(start_server):
    import httpx

    server = start_server(max_texts_per_request=3, max_classifiers_per_request=2, max_chars_per_text=40,
                          max_body_bytes=4000)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/classify", json={"texts": ["a", "b", "c", "d"], "classifiers": ["spam"]})
        assert r.status_code == 413 and r.json()["error_type"] == "too_large"
        assert "4 texts" in r.json()["error"] and "limit is 3" in r.json()["error"]
        r = c.post("/classify", json={"texts": ["a"], "classifiers": ["spam", "urgency", "sentiment"]})
        assert r.status_code == 413 and "limit is 2" in r.json()["error"]
        r = c.post("/classify", json={"texts": ["ok", "x" * 41], "classifiers": ["spam"]})
        assert r.status_code == 413 and "texts[1] has 41 characters; the limit is 40" in r.json()["error"]
        r = c.post("/classify", json={"texts": ["y" * 5000], "classifiers": ["spam"]})
        assert r.status_code == 413 and r.json()["error_type"] == "too_large" and "4000 bytes" in r.json()["error"]
        # and nothing was held against the next, valid request
        r = c.post("/classify", json={"texts": ["fine"], "classifiers": ["spam"]})
        assert r.status_code == 200


def test_tei_embed_shape_and_same_cache_as_classify(client, minilm):
    texts = ["embeddings through the TEI endpoint", "second input"]
    r = client.post("/embed", json={"inputs": texts})
    assert r.status_code == 200
    vecs = np.asarray(r.json(), dtype=np.float32)
    assert vecs.shape == (2, minilm.dim)
    np.testing.assert_allclose(vecs, minilm.embed(texts).vectors, atol=1e-5)
    single = client.post("/embed", json={"inputs": texts[0]}).json()
    assert len(single) == 1 and np.allclose(single[0], vecs[0], atol=1e-6)
    out = client.post("/classify", json={"texts": texts, "classifiers": ["spam"]}).json()
    assert out["cache"]["hits"]["memory"] == 2 and out["cache"]["computed"] == 0


def test_tei_embed_refuses_an_over_long_input_unless_truncate(client, minilm):
    long_text = "word " * 400
    r = client.post("/embed", json={"inputs": [long_text]})
    assert r.status_code == 413 and "truncate=true" in r.json()["error"]
    r = client.post("/embed", json={"inputs": [long_text], "truncate": True})
    assert r.status_code == 200 and len(r.json()[0]) == minilm.dim
    r = client.post("/embed", json={"inputs": ["x"], "normalize": False})
    assert r.status_code == 422 and "normalize" in r.json()["error"]


def test_openai_client_gets_embeddings(single, minilm):
    import openai

    oa = openai.OpenAI(base_url=single.url + "/v1", api_key="unused-in-single-tenant-mode")
    texts = ["the official OpenAI client, pointed at headfleet", "a second text"]
    res = oa.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    got = np.asarray([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, minilm.embed(texts).vectors, atol=1e-5)
    assert [d.index for d in res.data] == [0, 1]
    assert res.usage.prompt_tokens == int(minilm.count_tokens(texts).n_tokens.sum())
    floats = oa.embeddings.create(model="headfleet", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, got[0], atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        oa.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.UnprocessableEntityError):
        oa.embeddings.create(model="headfleet", input=[[1, 2, 3]])
    assert "all-MiniLM-L6-v2" in [m.id for m in oa.models.list()]


def test_metrics_parse_and_count_what_happened(client):
    def scrape() -> dict:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(families, family, sample_name, **labels):
        if family not in families:  # a counter nothing has touched yet is 0
            return 0.0
        return sum(s.value for s in families[family].samples
                   if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))

    counted = {  # (family, sample, labels) -> what the three requests below add (the server is shared: deltas)
        ("headfleet_cache_lookups", "headfleet_cache_lookups_total", (("tier", "memory"),)): 1,
        ("headfleet_cache_lookups", "headfleet_cache_lookups_total", (("tier", "miss"),)): 1,
        ("headfleet_failures", "headfleet_failures_total", (("error_type", "not_found"),)): 1,
        ("headfleet_request_seconds", "headfleet_request_seconds_count", (("endpoint", "/classify"), ("status", "2xx"))): 2,
        ("headfleet_request_seconds", "headfleet_request_seconds_count", (("endpoint", "/classify"), ("status", "4xx"))): 1,
        ("headfleet_batch_texts", "headfleet_batch_texts_count", ()): 1,
    }
    before = scrape()
    client.post("/classify", json={"texts": ["metrics text one"], "classifiers": ["spam"]})  # a miss, one batch
    client.post("/classify", json={"texts": ["metrics text one"], "classifiers": ["spam"]})  # a memory hit
    client.post("/classify", json={"texts": ["x"], "classifiers": ["missing"]})  # a 404
    after = scrape()
    for name in ("headfleet_request_seconds", "headfleet_queue_seconds", "headfleet_embed_seconds",
                 "headfleet_heads_seconds", "headfleet_cache_lookups", "headfleet_batch_texts",
                 "headfleet_rejected", "headfleet_failures"):
        assert name in after, name
    got = {k: value(after, k[0], k[1], **dict(k[2])) - value(before, k[0], k[1], **dict(k[2])) for k in counted}
    assert got == counted


def _documented_operations(app) -> set[tuple[str, str]]:
    """(path, method) of every operation the app serves and puts in its schema, in OpenAPI's path syntax."""
    ops = set()
    for route in app.routes:
        if route.path.startswith("/schema"):
            continue
        for handler in getattr(route, "route_handlers", ()):
            if getattr(handler, "include_in_schema", True):
                path = re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.path)
                ops |= {(path, m.lower()) for m in handler.http_methods if m not in ("OPTIONS", "HEAD")}
    return ops


def test_health_info_schema(client, minilm, single):
    assert client.get("/health").json()["status"] == "ready"
    info = client.get("/info").json()
    assert info["backbone"]["fingerprint"] == minilm.fingerprint
    assert info["backbone"]["dim"] == minilm.dim
    assert info["tenancy"] == "single"
    assert info["limits"]["max_texts_per_request"] > 0
    schema = client.get("/schema/openapi.json").json()
    documented = {(p, m) for p, ops in schema["paths"].items() for m in ops if m not in ("parameters", "options")}
    served = _documented_operations(single.app)
    assert {("/classify", "post"), ("/v1/embeddings", "post"), ("/embed", "post")} <= served
    assert documented == served  # every operation served is documented, and nothing documented is missing
    for path, method in documented:  # each one that takes a key says what a missing key gets
        op = schema["paths"][path][method]
        if op.get("security") != [{}]:
            assert "401" in op["responses"], (path, method, sorted(op["responses"]))


def test_stats_report_hits_per_tier_and_classifier(client):
    texts = ["stats text alpha", "stats text beta"]
    client.post("/classify", json={"texts": texts, "classifiers": ["spam", "urgency"]})
    before = client.get("/stats").json()
    client.post("/classify", json={"texts": texts, "classifiers": ["spam", "urgency"]})
    after = client.get("/stats").json()
    assert after["tenant"] == "default"
    s0, s1 = before["since_start"], after["since_start"]
    assert s1["hits"]["memory"] - s0["hits"]["memory"] == 2
    assert s1["computed"] == s0["computed"]
    assert s1["fanout_saved"] - s0["fanout_saved"] == 2  # two texts, one embedding each for two classifiers
    assert s1["classifiers"]["spam"]["lookups"] - s0["classifiers"]["spam"]["lookups"] == 2
    assert after["windows"]["1m"]["lookups"] >= 4
    assert after["held"]["memory"]["entries"] >= 2 and after["held"]["local"]["bytes"] > 0


@pytest.mark.parametrize("path, body, fix", [
    ("/classify", {"texts": ["hello"], "classifiers": ["s" * 100_000]}, "use 1-64 of a-z"),  # not a name
    ("/classify", {"texts": ["hello"], "classifiers": ["spam@" + "x" * 100_000]}, "use 1-32 of a-z"),  # nor an alias
    ("/classify", {"texts": ["hello"], "classifiers": ["spam"], "namespace": "n" * 100_000}, "use 1-64 of a-z"),
    ("/v1/embeddings", {"input": "hello", "model": "m" * 100_000}, "use one of"),  # cut in the middle
])
def test_an_error_never_echoes_a_huge_input_back_whole(client, path, body, fix):
    """A 100 KB name is refused with a short message that still ends with what to do, quoting only
    part of it (helper's trial: the 422 came back at ~100 KB); on /v1 in OpenAI's shape too."""
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert len(r.content) < 3_000, len(r.content)
    err = r.json()["error"]
    message = err["message"] if isinstance(err, dict) else err
    assert fix in message[-200:], message[-300:]


def test_every_route_has_a_latency_label_of_its_own_or_its_family(client):
    """The request histogram's endpoint label: each fixed public route is its own label, routes with
    ids in them fall into their family's prefix, and none falls into "other" (GET /v1/models was
    counted as "/v1", POST /feedback as "other")."""
    from headfleet.service.app import _endpoint

    spec = client.get("/schema/openapi.json").json()
    paths = [p.replace("{", "").replace("}", "") for p in spec["paths"]]
    assert "/v1/models" in paths and "/feedback" in paths
    for path in paths:
        assert _endpoint(path) != "other", path
    for path in ("/v1/models", "/v1/embeddings", "/feedback", "/classify", "/stats"):
        assert _endpoint(path) == path
    client.get("/v1/models")
    text = client.get("/metrics").text
    assert 'headfleet_request_seconds_count{endpoint="/v1/models",status="2xx"}' in text
