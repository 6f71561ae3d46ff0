"""Shadow scoring on a real engine: the caller's answer is unchanged, agreement and flips equal
what scoring both versions directly gives, feedback makes McNemar's table, state survives a restart."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from headfleet.engine import Engine
from headfleet.errors import NotFoundError, ValidationError
from headfleet.heads import examples_from_records
from headfleet.lifecycle.feedback import FeedbackBook, Labelled
from headfleet.lifecycle.shadow import Shadows
from headfleet.lifecycle.store_file import FileStore
from headfleet.settings import Settings

SPAM = [("win a free prize now, text CLAIM", "spam"), ("urgent! your account won cash, call now", "spam"),
        ("free entry to win a holiday, reply YES", "spam"), ("claim your free ringtone today", "spam"),
        ("are we still on for lunch?", "ham"), ("see you at the station at six", "ham"),
        ("can you send me the notes from class", "ham"), ("mum says dinner is at eight", "ham"),
        ("running late, start without me", "ham"), ("thanks for yesterday, it was fun", "ham")] * 3
# a second version that learned something else: prizes are ham to it, plans are spam
FLIPPED = [(t, "ham" if lab == "spam" else "spam") if i % 10 in (0, 1, 4, 5) else (t, lab) for i, (t, lab) in enumerate(SPAM)]
TOPICS = [("the server is down again", ["ops"]), ("deploy failed on the api", ["ops"]),
          ("invoice 33 is overdue", ["billing"]), ("refund the double charge", ["billing"]),
          ("the outage delayed every invoice", ["ops", "billing"]), ("card charged twice during the outage", ["ops", "billing"]),
          ("lunch at noon?", []), ("see you tomorrow", [])] * 4
TEXTS = ([t for t, _ in SPAM[:10]] + [f"message {i}: shall we win lunch or claim a prize at six" for i in range(30)]
         + ["free cash for class notes", "call me about dinner, urgent"])


@pytest.fixture
def engine(minilm, tmp_path):
    eng = Engine.open(Settings(data_dir=tmp_path / "data", device="cpu", faiss_store=False), minilm)
    eng.train("acme", "spam", examples_from_records([{"text": t, "label": lab} for t, lab in SPAM]))
    eng.train("acme", "spam", examples_from_records([{"text": t, "label": lab} for t, lab in FLIPPED]),
              candidate=True)
    yield eng
    eng.close()


@pytest.fixture
def shadows(engine, tmp_path):
    sh = Shadows(engine, FileStore(tmp_path / "mon")).attach()
    yield sh
    sh.close()


def labels_of(out, ref):
    return [r["classifications"][ref]["label"] for r in out["results"]]


def test_the_answer_is_unchanged_and_agreement_and_flips_equal_direct_scoring(engine, shadows):
    before = engine.classify("acme", TEXTS, ["spam"])
    state = shadows.set("acme", "spam", {"version": "candidate"})
    assert state["shadow"] == "spam@2" and state["sample"] is None
    during = engine.classify("acme", TEXTS, ["spam"])
    assert [r["classifications"] for r in during["results"]] == [r["classifications"] for r in before["results"]]
    debug = engine.classify("acme", TEXTS, ["spam"], debug=True)
    direct = engine.classify("acme", TEXTS, ["spam@1", "spam@2"], live=False)
    assert [r["classifications"]["spam"]["shadow"] for r in debug["results"]] == \
        [r["classifications"]["spam@2"] for r in direct["results"]]
    report = shadows.report("acme", "spam")
    live, shadow = labels_of(direct, "spam@1"), labels_of(direct, "spam@2")
    assert report["live"] == "spam@1" and report["shadow"] == "spam@2"
    assert report["n"] == 2 * len(TEXTS)  # the two live requests while it ran (the job-like call is not live)
    agree = sum(a == b for a, b in zip(live, shadow))
    assert 0 < agree < len(TEXTS)  # the versions disagree on some texts, so the figures mean something
    assert report["agreement"] == pytest.approx(agree / len(TEXTS), abs=1e-6)
    expected = {a: {b: 0 for b in ("ham", "spam")} for a in ("ham", "spam")}
    for a, b in zip(live, shadow):
        expected[a][b] += 2
    assert report["flips"] == expected  # the full matrix: every cell, zeros and the diagonal included
    assert report["per_label"]["spam"]["live"] == 2 * live.count("spam")
    assert report["per_label"]["spam"]["shadow"] == 2 * shadow.count("spam")
    # pinned and bare refs in one request: the shadow joins the first only (texts counted once)
    engine.classify("acme", TEXTS[:5], ["spam", "spam@1"])
    assert shadows.report("acme", "spam")["n"] == 2 * len(TEXTS) + 5


def test_feedback_labels_make_the_accuracy_and_mcnemar_figures(engine, shadows, tmp_path):
    shadows.set("acme", "spam", {"version": 2})
    out = engine.classify("acme", TEXTS, ["spam@1", "spam@2"], live=False)
    engine.classify("acme", TEXTS, ["spam"])
    truth = ["spam" if any(w in t for w in ("win", "free", "claim", "cash", "urgent")) else "ham" for t in TEXTS]
    FeedbackBook(shadows.store).add("acme", "spam", Labelled(TEXTS, truth), keep=1000)
    fb = shadows.report("acme", "spam")["with_feedback"]
    live_ok = np.array([a == t for a, t in zip(labels_of(out, "spam@1"), truth)])
    shadow_ok = np.array([b == t for b, t in zip(labels_of(out, "spam@2"), truth)])
    b, c = int((live_ok & ~shadow_ok).sum()), int((~live_ok & shadow_ok).sum())
    assert fb["n"] == len(TEXTS)
    assert fb["live_accuracy"] == pytest.approx(live_ok.mean(), abs=1e-6)
    assert fb["shadow_accuracy"] == pytest.approx(shadow_ok.mean(), abs=1e-6)
    assert (fb["negative_flips"], fb["positive_flips"]) == (b, c) and b > 0
    assert fb["mcnemar_p"] == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue)


def test_a_shadow_persists_across_a_restart_and_stops_cleanly(engine, shadows, tmp_path):
    shadows.set("acme", "spam", {"version": 2})
    engine.classify("acme", TEXTS[:10], ["spam"])
    shadows.close()
    again = Shadows(engine, FileStore(tmp_path / "mon")).attach()  # a restart: same store
    try:
        engine.classify("acme", TEXTS[:10], ["spam"])
        assert again.report("acme", "spam")["n"] == 20
        last = again.remove("acme", "spam")
        assert last["n"] == 20 and last["stopped"] is True
        engine.classify("acme", TEXTS[:10], ["spam"], debug=True)
        with pytest.raises(NotFoundError):
            again.report("acme", "spam")
    finally:
        again.close()


def test_bad_shadows_are_refused_and_tenants_see_only_theirs(engine, shadows):
    with pytest.raises(ValidationError, match="sample is only for LoRA"):
        shadows.set("acme", "spam", {"version": 2, "sample": 0.1})
    with pytest.raises(ValidationError, match="serves now"):
        shadows.set("acme", "spam", {"version": 1})
    with pytest.raises(NotFoundError):
        shadows.set("acme", "spam", {"version": 7})
    with pytest.raises(NotFoundError):
        shadows.set("acme", "nope", {"version": 2})
    with pytest.raises(ValidationError):
        shadows.set("acme", "spam", {"version": True})
    shadows.set("acme", "spam", {"version": 2})
    with pytest.raises(NotFoundError):
        shadows.report("other", "spam")
    engine.train("other", "spam", examples_from_records([{"text": t, "label": lab} for t, lab in SPAM]))
    out = engine.classify("other", TEXTS[:3], ["spam"], debug=True)
    assert all("shadow" not in r["classifications"]["spam"] for r in out["results"])  # acme's shadow only


def test_multi_label_flips_are_counted_per_label(engine, shadows):
    recs = [{"text": t, "labels": labs} for t, labs in TOPICS]
    engine.train("acme", "topics", examples_from_records(recs, label_col="labels", multi_label=True))
    engine.train("acme", "topics", examples_from_records(recs, label_col="labels", multi_label=True), kind="mlp", candidate=True)
    shadows.set("acme", "topics", {"version": "candidate"})
    texts = [t for t, _ in TOPICS[:8]] + ["outage and invoice", "nothing to see"]
    engine.classify("acme", texts, ["topics"])
    direct = engine.classify("acme", texts, ["topics@1", "topics@2"], live=False)
    flips = shadows.report("acme", "topics")["flips"]
    for label in ("ops", "billing"):
        want = {"on": {"on": 0, "off": 0}, "off": {"on": 0, "off": 0}}
        for r in direct["results"]:
            a = label in r["classifications"]["topics@1"]["labels"]
            b = label in r["classifications"]["topics@2"]["labels"]
            want["on" if a else "off"]["on" if b else "off"] += 1
        assert flips[label] == want


@pytest.fixture
def own_backbone_engine(tmp_path):
    """An engine on a backbone of its own: LoRA layers are injected into the backbone they serve on,
    and its adapter slots are the backbone's, so the session's shared one stays untouched."""
    from headfleet.embedder import Embedder

    eng = Engine.open(Settings(data_dir=tmp_path / "lora-data", device="cpu", faiss_store=False),
                      Embedder.load(max_length=128, batch_size=32, device="cpu"))
    eng.train("acme", "spam", examples_from_records([{"text": t, "label": lab} for t, lab in SPAM]))
    yield eng
    eng.close()


def test_a_lora_shadow_costs_a_forward_so_it_runs_on_its_sample_only(own_backbone_engine, tmp_path):
    from headfleet.embedder.lora_train import LoraTrainConfig

    engine = own_backbone_engine
    shadows = Shadows(engine, FileStore(tmp_path / "mon-lora")).attach()
    data = examples_from_records([{"text": t, "label": lab} for t, lab in SPAM])
    engine.train("acme", "spam", data)  # v2 (a head), so the adapter below is v3 as with the other tests
    engine.train_lora("acme", "spam", data, config=LoraTrainConfig(epochs=1, rank=2, alpha=4))  # v3, latest
    engine.registry.set_alias("acme", "spam", "latest", 1)
    with pytest.raises(ValidationError, match="costs a backbone forward"):
        shadows.set("acme", "spam", {"version": 3})
    shadows.set("acme", "spam", {"version": 3, "sample": 1.0})
    debug = engine.classify("acme", TEXTS[:6], ["spam"], debug=True)
    direct = engine.classify("acme", TEXTS[:6], ["spam@3"], live=False)
    for a, b in zip(debug["results"], direct["results"]):  # the adapter's own embedding, as served directly
        assert a["classifications"]["spam"]["shadow"]["scores"] == pytest.approx(
            b["classifications"]["spam@3"]["scores"], abs=2e-6)
        assert a["classifications"]["spam"]["version"] == 1
    assert shadows.report("acme", "spam")["n"] == 6
    shadows.set("acme", "spam", {"version": 3, "sample": 0.25})  # a quarter of requests pay the forward
    for i in range(40):
        engine.classify("acme", [f"sampled text number {i}"], ["spam"])
    shadowed = shadows.report("acme", "spam")["n"]
    assert 2 <= shadowed <= 22  # binomial(40, 0.25): its 99.9 % interval
    shadows.close()
