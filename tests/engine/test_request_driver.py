"""The one embedding request path: begin (in-process tiers) -> compute (injected) -> complete,
and the observer hooks lifecycle features subscribe to."""

from __future__ import annotations

import numpy as np
import pytest

from headfleet.engine import Engine
from headfleet.heads import examples_from_records
from headfleet.settings import Settings

SPAM = ([(f"win a free prize number {i}, claim now", "spam") for i in range(6)]
        + [(f"see you at lunch on day {i}", "ham") for i in range(6)])


@pytest.fixture
def engine(minilm, tmp_path):
    eng = Engine.open(Settings(data_dir=tmp_path / "data", device="cpu"), embedder=minilm)
    eng.train("acme", "spam", examples_from_records(SPAM))
    yield eng
    eng.close()


def test_an_injected_compute_gets_each_distinct_miss_once_and_progress_counts_every_row(engine):
    calls = []

    def compute(keys, texts, namespaces, progress):
        calls.append(list(texts))
        return engine.compute_here(keys, texts, namespaces, progress)

    done = []
    texts = ["a text nobody sent", "another new one", "a text nobody sent", SPAM[0][0]]  # a repeat, a cached one
    batch = engine.embed("acme", texts, compute=compute, progress=done.append)
    assert calls == [["a text nobody sent", "another new one"]]
    assert sum(done) == len(texts)
    assert batch.tiers == [None, None, None, "memory"] and batch.computed == 2
    again = engine.embed("acme", texts, compute=compute)
    assert len(calls) == 1 and again.tiers == ["memory"] * 4  # nothing missing: compute not called
    np.testing.assert_array_equal(again.vectors, batch.vectors)


def test_observers_see_each_request_once_and_cannot_break_it(engine):
    embedded, scored = [], []
    engine.embedded_hooks.append(lambda tenant, names, batches: embedded.append((tenant, names, len(batches))))
    engine.scored_hooks.append(lambda s: scored.append(
        (s.tenant, [r.key if hasattr(r, "key") else r[1] for r in s.resolved], len(s.answer["results"]), s.source,
         [len(batch.vectors) for batch, _ in s.parts])))
    engine.scored_hooks.append(lambda *a: 1 / 0)  # a broken observer
    out = engine.classify("acme", ["claim your prize", "lunch?"], ["spam"])
    assert [r["classifications"]["spam"]["label"] for r in out["results"]] == ["spam", "ham"]
    assert embedded == [("acme", [["spam"]], 1)]
    assert scored == [("acme", ["acme/spam@1"], 2, "classify", [2])]


def test_a_request_over_several_embedding_groups_reports_every_groups_lookup_and_heads_time(engine, monkeypatch):
    """A LoRA classifier reads its own embedding beside the shared one: the answer's ``cache`` and
    ``heads`` phases sum every group's, while queue and embed were one step for all of them."""
    parts = iter([
        {"results": [{"index": 0, "truncated": False, "cache": "memory", "classifications": {"a": {}}}],
         "cache": {"hits": {"memory": 1}, "misses": 0, "computed": 0},
         "timing_ms": {"adapter_load": 0.0, "cache": 1.25, "queue": 4.0, "embed": 9.0, "heads": 0.5}},
        {"results": [{"index": 0, "truncated": True, "cache": "miss", "classifications": {"b": {}}}],
         "cache": {"hits": {}, "misses": 1, "computed": 1},
         "timing_ms": {"adapter_load": 0.0, "cache": 2.5, "queue": 4.0, "embed": 9.0, "heads": 0.25}},
    ])
    monkeypatch.setattr(engine, "score", lambda batch, items: next(parts))
    out = engine.score_groups([(None, []), (None, [])], [("a", "k1", {}), ("b", "k2", {})])
    assert out["timing_ms"] == {"adapter_load": 0.0, "cache": 3.75, "queue": 4.0, "embed": 9.0, "heads": 0.75}
    assert out["results"][0]["cache"] == "partial" and out["results"][0]["truncated"] is True
    assert out["cache"] == {"hits": {"memory": 1}, "misses": 1, "computed": 1}
