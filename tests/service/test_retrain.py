"""A backend switch (torch fp32 -> ONNX int8) as an operator lives it: the heads trained before are
listed as stale, refuse to load, and ``Engine.retrain`` refits them from their stored training data
on the new backbone, keeping kind, seed, labels and aliases."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from headfleet.errors import ParentMismatchError
from headfleet.heads import load_examples
from headfleet.heads.retrain import needs_retrain, stored_examples
from headfleet.engine import Engine
from headfleet.engine.examples import DEMO_TEXTS, ensure_examples
from headfleet.settings import Settings
from http_server import running

EXAMPLES = Path(__file__).resolve().parents[2] / "engine" / "example_data"
ASKED = ["spam", "urgency", "urgency@prod", "sentiment"]


@pytest.fixture(scope="module")
def int8(onnx_cache):
    from headfleet.embedder import Embedder

    return Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="int8",
                         cache_dir=onnx_cache)


def _labels(out: dict) -> list[dict[str, str]]:
    return [{ref: c["label"] for ref, c in r["classifications"].items()} for r in out["results"]]


def test_training_stores_its_data_with_the_version(minilm, tmp_path):
    examples = load_examples(EXAMPLES / "urgency.csv")
    with Engine.open(Settings(data_dir=tmp_path / "data", device="cpu"), embedder=minilm) as eng:
        m = eng.train("acme", "urgency", examples)
        stored = eng.registry.version_dir("acme", m) / m["training_data"]["file"]
        assert stored.is_file() and m["training_data"]["n_examples"] == len(examples)
        back = stored_examples(eng.registry, "acme", m)
    assert back.texts == examples.texts and back.labels == examples.labels
    assert back.source_hash == m["training_data_hash"]


def test_a_backend_switch_then_retrain_gives_loadable_heads_with_the_same_labels(minilm, int8, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    with Engine.open(settings, embedder=minilm) as old:  # torch fp32, the default
        ensure_examples(old, tenant="acme")  # spam, urgency, sentiment: logistic regression, seed 0
        old.train("acme", "urgency", load_examples(EXAMPLES / "urgency.csv"), kind="mlp", seed=3)  # urgency@2
        old.registry.set_alias("acme", "urgency", "prod", 1)
        before = _labels(old.classify("acme", DEMO_TEXTS, ASKED))
        _, head = old.registry.load("acme", "sentiment")  # a version saved before training data was kept:
        old.registry.save("acme", "legacy", head, {"parent_fingerprint": minilm.fingerprint})

    assert int8.fingerprint != minilm.fingerprint
    with Engine.open(settings, embedder=int8) as eng:
        with pytest.raises(ParentMismatchError, match="retrain"):
            eng.classify("acme", DEMO_TEXTS, ["spam"])
        assert needs_retrain(eng.registry, "acme", int8.fingerprint) == {
            "legacy": ["latest"], "sentiment": ["latest"], "spam": ["latest"], "urgency": ["prod", "latest"]}
        with running(int8, settings.data_dir, api_keys="acme:k1") as server:  # the service says so too
            listing = httpx.get(f"{server.url}/classifiers", headers={"Authorization": "Bearer k1"},
                                timeout=30).json()["classifiers"]
        assert {c["name"]: c["needs_retrain"] for c in listing} == {
            "legacy": True, "sentiment": True, "spam": True, "urgency": True}

        plan = eng.retrain("acme", dry_run=True)
        assert [(r["classifier"], r["version"], r["status"]) for r in plan] == [
            ("legacy", 1, "no_training_data"), ("sentiment", 1, "would_retrain"), ("spam", 1, "would_retrain"),
            ("urgency", 1, "would_retrain"), ("urgency", 2, "would_retrain")]
        assert eng.registry.versions("acme", "spam") == [1]  # a dry run saves nothing

        done = {(r["classifier"], r["version"]): r for r in eng.retrain("acme")}
        assert done["legacy", 1]["status"] == "no_training_data"
        assert {k: r.get("new_version") for k, r in done.items()} == {
            ("legacy", 1): None, ("sentiment", 1): 2, ("spam", 1): 2, ("urgency", 1): 3, ("urgency", 2): 4}

        after = _labels(eng.classify("acme", DEMO_TEXTS, ASKED))  # every head loads on int8
        assert after == before
        latest, prod = eng.registry.resolve("acme", "urgency"), eng.registry.resolve("acme", "urgency@prod")
        assert (latest["version"], latest["type"], latest["metrics"]["seed"]) == (4, "mlp", 3)
        assert (prod["version"], prod["type"], prod["metrics"]["seed"]) == (3, "logreg", 0)
        for m, source in ((latest, 2), (prod, 1)):
            assert m["parent_fingerprint"] == int8.fingerprint
            assert m["retrained_from"] == {"version": source, "parent_fingerprint": minilm.fingerprint}
            assert m["training_data_hash"] == eng.registry.resolve("acme", f"urgency@{source}")["training_data_hash"]
            assert m["labels"] == ["routine", "urgent"]
        assert [(r["classifier"], r["status"]) for r in eng.retrain("acme")] == [("legacy", "no_training_data")]
