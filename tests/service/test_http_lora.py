"""A LoRA classifier over HTTP: trained as a job, served beside a head in one call, private to its tenant."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from headfleet.heads.adapters import LoraAdapter
from http_server import running

ALICE, BOB, ADMIN = "alice-key-lora", "bob-key-lora", "admin-key-lora"
SPAM_CSV = Path(__file__).resolve().parents[2] / "engine" / "example_data" / "spam.csv"


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    with running(minilm, tmp_path_factory.mktemp("lora"), api_keys=f"alice:{ALICE},bob:{BOB}",
                 admin_key=ADMIN) as s:
        yield s


def _client(server, key):
    return httpx.Client(base_url=server.url, timeout=300, headers={"Authorization": f"Bearer {key}"})


def _train(c, name, kind):
    with open(SPAM_CSV, newline="", encoding="utf-8") as f:
        examples = [{"text": r["text"], "label": r["label"]} for r in csv.DictReader(f)]
    r = c.post("/classifiers", json={"name": name, "kind": kind, "examples": examples})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = c.get(r.headers["location"]).json()["job"]
        if job["state"] in ("succeeded", "failed"):
            assert job["state"] == "succeeded", job
            return job
        time.sleep(0.2)
    raise AssertionError(f"training job did not finish: {job}")


def test_lora_classifier_trains_serves_beside_a_head_and_stays_private(server):
    with _client(server, ALICE) as alice, _client(server, BOB) as bob:
        _train(alice, "spam", "logreg")
        job = _train(alice, "spam-lora", "lora")
        # the adapter learned: the kept epoch is not epoch 0 (the frozen head with B = 0, which
        # "holdout accuracy >= frozen" lets through), and what was published has a non-zero B
        metrics = job["result"]["metrics"]
        assert metrics["best_epoch"] >= 1 and metrics["holdout_accuracy"] >= metrics["frozen_holdout_accuracy"], metrics
        engine = server.service.engine
        saved = LoraAdapter.from_folder(engine.registry.version_dir("alice", engine.registry.resolve("alice", "spam-lora")))
        assert max(float(np.abs(b).max()) for b in saved.B.values()) > 0
        shown = alice.get("/classifiers/spam-lora").json()
        adapter = (shown.get("classifier") or shown)["adapter"]
        assert adapter["rank"] == 8 and adapter["format"] == "peft-lora" and adapter["targets"] == ["query", "value"]
        texts = ["WINNER!! Claim your free prize, text WIN to 80086 now", "Can we push lunch to 1pm?"]
        r = alice.post("/classify", json={"texts": texts, "classifiers": ["spam", "spam-lora"]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["cache"]["computed"] == 4  # the shared embedding and the adapter's, per text
        labels = [{k: v["label"] for k, v in res["classifications"].items()} for res in out["results"]]
        assert labels[0]["spam-lora"] == "spam" and labels[1]["spam-lora"] == "ham"
        again = alice.post("/classify", json={"texts": texts, "classifiers": ["spam-lora"]}).json()
        assert again["cache"]["computed"] == 0 and again["cache"]["hits"]["memory"] == 2
        # bob cannot use, see or probe alice's adapter
        r = bob.post("/classify", json={"texts": texts, "classifiers": ["spam-lora"]})
        assert r.status_code == 404 and r.json()["error_type"] == "not_found"
        assert all(c["name"] != "spam-lora" for c in bob.get("/classifiers").json()["classifiers"])
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    loads = [line for line in metrics.splitlines() if line.startswith("headfleet_adapter_load_seconds_count")]
    assert loads and float(loads[0].split()[-1]) >= 1
    assert 'headfleet_adapters{state="slots_used"} 1.0' in metrics


def test_unknown_kind_is_a_422_naming_the_choices(server):
    with _client(server, ALICE) as alice:
        r = alice.post("/classifiers", json={"name": "x", "kind": "svm", "examples": [{"text": "a", "label": "b"}]})
        assert r.status_code == 422 and r.json()["error"].endswith("(expected one of: 'logreg', 'mlp', 'lora')")


def test_a_lora_classifier_says_so_in_the_listing_the_cache_field_and_the_timing(server, random_lora):
    """What a new user of LoRA classifiers reads over HTTP: the listing shows the adapter, each text's
    ``cache`` covers the shared and the adapter's embedding, and the first request's adapter read is a phase."""
    with _client(server, ALICE) as alice:
        _train(alice, "plain", "logreg")
        random_lora(server.service.engine, "alice", "tuned")
        listed = {c["name"]: c for c in alice.get("/classifiers").json()["classifiers"]}
        assert listed["plain"]["adapter"] is None
        assert listed["tuned"]["type"] == "logreg" and listed["tuned"]["adapter"]["rank"] == 4
        assert listed["tuned"]["adapter"]["targets"] == ["query", "value"]

        seen = ["an old text the head has read", "an old text the adapter has read"]
        head = alice.post("/classify", json={"texts": seen[:1], "classifiers": ["plain"]}).json()
        assert head["timing_ms"]["adapter_load"] == 0
        first = alice.post("/classify", json={"texts": seen[1:], "classifiers": ["tuned"]}).json()
        assert first["timing_ms"]["adapter_load"] > 0  # its adapter was read and checked at resolution
        assert first["timing_ms"]["adapter_load"] <= first["timing_ms"]["total"]
        out = alice.post("/classify", json={"texts": [*seen, "a new text"], "classifiers": ["plain", "tuned"]}).json()
        assert [r["cache"] for r in out["results"]] == ["partial", "partial", "miss"]
        assert out["cache"] == {"hits": {"memory": 2, "local": 0, "redis": 0}, "misses": 4, "computed": 4}
        assert out["timing_ms"]["adapter_load"] == 0


def test_a_restart_on_a_folder_with_lora_keeps_counting_adapter_loads(minilm, tmp_path, random_lora):
    """A service started on a folder that already holds a LoRA classifier sets its adapter layers up
    at start; the adapter loads of its requests still reach ``/metrics``."""
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    data = tmp_path / "data"
    with Engine.open(Settings(data_dir=data, device="cpu"), minilm) as engine:
        random_lora(engine, "default", "legal", seed=3)
    with running(minilm, data, examples=False) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        r = c.post("/classify", json={"texts": ["Is this contract binding?"], "classifiers": ["legal"]})
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text
    loads = [line for line in metrics.splitlines() if line.startswith("headfleet_adapter_load_seconds_count")]
    assert loads and float(loads[0].split()[-1]) >= 1
