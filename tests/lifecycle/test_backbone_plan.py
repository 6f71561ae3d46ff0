"""The backbone-upgrade gate on real candidate backbones: MiniLM cut to one layer (as a distilled,
smaller model would be) must be flagged; MiniLM's own ONNX int8 export (another fingerprint,
near-identical vectors) must pass; a second plan reuses the cache and the partial results."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from headfleet.embedder import Embedder, default_model_path
from headfleet.engine import Engine
from headfleet.heads import examples_from_records, load_examples
from headfleet.heads.examples import TRAINING_DATA_FILE
from headfleet.heads.split import holdout_split
from headfleet.lifecycle.backbone_plan import Thresholds, plan
from headfleet.lifecycle.feedback import Labelled
from headfleet.settings import Settings


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory):
    """all-MiniLM-L6-v2 with only its first encoder layer: another, weaker backbone."""
    from transformers import BertModel

    src = default_model_path()
    folder = tmp_path_factory.mktemp("minilm-1-layer")
    model = BertModel.from_pretrained(src)
    model.encoder.layer = model.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        shutil.copy(src / name, folder / name)
    (folder / "1_Pooling").mkdir()
    shutil.copy(src / "1_Pooling" / "config.json", folder / "1_Pooling" / "config.json")
    return folder


@pytest.fixture(scope="module")
def fleet(minilm, sms_spam_path, tmp_path_factory):
    """A data folder with three classifiers of tenant acme (two SMS spam heads, one topic head with
    a canary) and one of tenant bob, each trained on real texts and stored with its data."""
    data = tmp_path_factory.mktemp("fleet")
    sms = load_examples(sms_spam_path)
    rng = random.Random(3)
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=minilm) as eng:
        for tenant, name, kind, seed in (("acme", "spam", "logreg", 0), ("acme", "spam-mlp", "mlp", 1),
                                         ("bob", "spam", "logreg", 2)):
            idx = rng.sample(range(len(sms)), 300)
            eng.train(tenant, name, examples_from_records(
                [{"text": sms.texts[i], "label": sms.labels[i]} for i in idx]), kind=kind, seed=seed)
        eng.train("acme", "spam", examples_from_records(
            [{"text": sms.texts[i], "label": sms.labels[i]} for i in rng.sample(range(len(sms)), 300)]),
            candidate=True)  # a candidate version is aliased too: it is gated as well
    canary_idx = rng.sample(range(len(sms)), 80)
    canary = Labelled([sms.texts[i] for i in canary_idx], [sms.labels[i] for i in canary_idx])
    return data, canary


def run_plan(minilm, data, candidate_embedder, out, canary, **kw):
    """One plan as ``headfleet backbone plan`` runs it: both engines on the data folder's cache tiers
    (the local store is saved when they close). Returns the plan, the progress calls and the
    candidate backbone's forward passes during it."""
    before = candidate_embedder.forwards
    with Engine.open(Settings(data_dir=data, device="cpu"), embedder=minilm) as current, \
            Engine.open(Settings(data_dir=data, device="cpu"), embedder=candidate_embedder) as cand:
        seen = []
        doc = plan(current, cand, ["acme", "bob"], out=out, progress=lambda d, t: seen.append((d, t)),
                   canary_for=lambda t, n: canary if (t, n) == ("acme", "spam") else None, **kw)
    return doc, seen, candidate_embedder.forwards - before


def test_a_one_layer_backbone_is_flagged_and_a_second_plan_costs_no_forward(minilm, fleet, one_layer_dir, tmp_path):
    data, canary = fleet
    weak = Embedder.load(one_layer_dir, max_length=256, batch_size=32, device="cpu")
    out = tmp_path / "plan.json"
    doc, seen, first = run_plan(minilm, data, weak, out, canary,
                                thresholds=Thresholds(max_drop=0.0, max_negative_flips=0.0))
    assert first > 0
    assert seen[-1] == (4, 4)  # acme: spam@1 (latest), spam@2 (candidate), spam-mlp@1; bob: spam@1
    assert [r["key"] for r in doc["classifiers"]] == ["acme/spam@1", "acme/spam@2", "acme/spam-mlp@1", "bob/spam@1"]
    assert doc["from"]["fingerprint"] == minilm.fingerprint and doc["to"]["fingerprint"] == weak.fingerprint
    assert doc["summary"]["regression"] >= 1
    bad = [r for r in doc["classifiers"] if r["verdict"] == "regression"]
    for r in bad:
        h = r["holdout"]
        assert r["reasons"] and (h["drop"] > 0 or h["negative_flips"] > 0)
        assert h["mcnemar_p"] is None or 0 <= h["mcnemar_p"] <= 1
    spam = next(r for r in doc["classifiers"] if r["key"] == "acme/spam@1")
    assert spam["canary"]["n"] == 80 and spam["holdout"]["n"] == 60  # 20 % of 300, the recorded split
    assert json.loads(out.read_text()) == doc
    staged = out.with_name("plan.json.staged") / spam["staged"]
    assert (staged / "weights.safetensors").exists() or any(staged.iterdir())
    # a second plan (another output, the same backbones) reads every vector from the cache
    doc2, _, forwards = run_plan(minilm, data, weak, tmp_path / "again.json", canary,
                                 thresholds=Thresholds(max_drop=0.0, max_negative_flips=0.0))
    assert forwards == 0
    assert [r["verdict"] for r in doc2["classifiers"]] == [r["verdict"] for r in doc["classifiers"]]
    # resumable: the partial results of the first run are reused, nothing is recomputed
    out.unlink()
    doc3, _, forwards3 = run_plan(minilm, data, weak, out, canary,
                                  thresholds=Thresholds(max_drop=0.0, max_negative_flips=0.0))
    assert forwards3 == 0 and doc3["classifiers"] == doc["classifiers"]


def test_the_int8_export_of_the_same_model_passes(minilm, fleet, onnx_cache, tmp_path):
    data, canary = fleet
    int8 = Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="int8",
                         cache_dir=onnx_cache)
    assert int8.fingerprint != minilm.fingerprint
    doc, _, _ = run_plan(minilm, data, int8, tmp_path / "int8.json", canary)
    assert doc["summary"]["pass"] == doc["summary"]["classifiers"] == 4, doc["summary"]


def test_apply_refuses_a_regression_names_it_and_force_then_rollback_work(minilm, fleet, one_layer_dir, tmp_path):

    from headfleet.errors import ConflictError
    from headfleet.heads import Registry
    from headfleet.lifecycle.backbone_apply import apply, rollback

    data, canary = fleet
    weak = Embedder.load(one_layer_dir, max_length=256, batch_size=32, device="cpu")
    out = tmp_path / "plan.json"
    doc, _, _ = run_plan(minilm, data, weak, out, canary, thresholds=Thresholds(max_drop=0.0, max_negative_flips=0.0))
    bad = [r["key"] for r in doc["classifiers"] if r["verdict"] == "regression"]
    settings = Settings(data_dir=data, device="cpu")
    with pytest.raises(ConflictError) as refused:
        apply(out, settings, open_engine=lambda s: Engine.open(s, embedder=weak))
    assert all(k in refused.value.message for k in bad)
    assert not settings.layout.backbone.exists()  # nothing written
    done = apply(out, settings, force=True, open_engine=lambda s: Engine.open(s, embedder=weak))
    assert {f["key"] for f in done["forced_past"]} == set(bad)
    assert Settings.from_env(data_dir=data).model_path == str(one_layer_dir)  # the data folder's choice wins
    old, new = Registry(settings.layout.registry, minilm.fingerprint), Registry(settings.layout.registry, weak.fingerprint)
    assert old.aliases("acme", "spam") == {"latest": 1, "candidate": 2}  # the old backbone serves what it served
    moved = new.aliases("acme", "spam")
    assert moved["latest"] > 2 and moved["candidate"] > 2
    assert new.resolve("acme", "spam")["parent_fingerprint"] == weak.fingerprint
    assert new.resolve("acme", "spam")["upgraded_from"] == {"version": 1, "parent_fingerprint": minilm.fingerprint}
    # a human alias move afterwards wins on every backbone
    new.set_alias("acme", "spam", "candidate", 1)
    assert new.aliases("acme", "spam")["candidate"] == 1
    rollback(settings)
    assert Settings.from_env(data_dir=data).model_path is None and not settings.layout.backbone.exists()
    with pytest.raises(ConflictError):
        rollback(settings)


def test_the_int8_plan_applies_while_the_old_backbone_keeps_serving(minilm, fleet, onnx_cache, tmp_path):
    import threading

    from headfleet.lifecycle.backbone_apply import apply

    data, canary = fleet
    int8 = Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="int8",
                         cache_dir=onnx_cache)
    out = tmp_path / "int8.json"
    run_plan(minilm, data, int8, out, canary)
    errors, answers, stop = [], [], threading.Event()
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=minilm) as serving:
        def traffic():
            while not stop.is_set():
                try:
                    answers.append(serving.classify("acme", ["free prize, call now"], ["spam", "spam-mlp"]))
                except Exception as exc:  # the test fails on any
                    errors.append(exc)

        t = threading.Thread(target=traffic)
        t.start()
        try:
            settings = Settings(data_dir=data, device="cpu")
            apply(out, settings, open_engine=lambda s: Engine.open(s, embedder=int8))
            n = len(answers)
            while len(answers) < n + 3 and not errors:  # requests after the apply, on the old backbone
                stop.wait(0.05)
        finally:
            stop.set()
            t.join()
    assert not errors and answers
    assert {a["results"][0]["classifications"]["spam"]["version"] for a in answers} == {1}
    # a restart picks the applied backbone from the data folder and serves the refit versions
    restarted = Settings.from_env(data_dir=data)
    assert (restarted.backend, restarted.precision) == ("onnx", "int8")
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=int8) as after:
        got = after.classify("acme", ["free prize, call now"], ["spam"])["results"][0]["classifications"]["spam"]
    assert got["version"] > 2 and got["label"] == answers[-1]["results"][0]["classifications"]["spam"]["label"]


def test_a_tiny_classifier_is_compared_and_a_damaged_one_does_not_stop_the_plan(minilm, onnx_cache, tmp_path):
    """Training accepts 2 examples a class (1 trains, 1 is held out); the plan compares such a
    version on the same terms instead of refusing its 1-example train split and aborting every
    tenant's plan. A version whose stored data is damaged is "needs_data", named, with the reason,
    the others are still compared, and a rerun tries it again (its row is not kept as finished)."""
    data = tmp_path / "data"
    tiny = [{"text": t, "label": lab} for t, lab in (("who won the match tonight", "sport"),
                                                      ("the striker scored twice", "sport"),
                                                      ("the senate passed the budget", "politics"),
                                                      ("the minister resigned today", "politics"))]
    other = [{"text": f"{w} message number {i}", "label": lab} for i in range(12)
             for w, lab in (("urgent: reply now", "urgent"), ("see you next week", "calm"))]
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=minilm) as eng:
        eng.train("acme", "topic", examples_from_records(tiny))
        eng.train("acme", "urgency", examples_from_records(other))
        eng.train("acme", "damaged", examples_from_records(other), seed=1)
        # multi-label, label "c" on 2 rows that seed 35's split holds out both of: training fits with
        # "c" as an all-zero column; the plan must compare it the same way, not on 2 columns of 3
        tags = [["a"], ["b"], ["a", "c"], ["b", "c"], ["a"], ["b"], ["a"], ["b"], ["a"], ["b"]]
        tagged = examples_from_records([{"text": f"tag text {i}", "label": t} for i, t in enumerate(tags)],
                                       multi_label=True)
        assert tagged.targets()[holdout_split(tagged.targets(), True, 0.2, 35).train][:, 2].sum() == 0
        eng.train("acme", "tags", tagged, seed=35)
        manifest = eng.registry.resolve("acme", "damaged@1")
        stored = eng.registry.version_dir("acme", manifest) / manifest["training_data"].get("file", TRAINING_DATA_FILE)
    with open(stored, "ab") as f:
        f.write(b"\n")  # no longer the bytes its manifest's sha256 names
    int8 = Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="int8",
                         cache_dir=onnx_cache)
    out = tmp_path / "plan.json"
    with Engine.open(Settings(data_dir=data, device="cpu"), embedder=minilm) as current, \
            Engine.open(Settings(data_dir=data, device="cpu"), embedder=int8) as cand:
        doc = plan(current, cand, ["acme"], out=out)
    rows = {r["key"]: r for r in doc["classifiers"]}
    assert set(rows) == {"acme/topic@1", "acme/urgency@1", "acme/damaged@1", "acme/tags@1"}
    assert rows["acme/tags@1"]["verdict"] in ("pass", "regression") and rows["acme/tags@1"]["holdout"]["n"] == 3
    assert rows["acme/topic@1"]["verdict"] in ("pass", "regression") and rows["acme/topic@1"]["holdout"]["n"] == 2
    assert rows["acme/urgency@1"]["verdict"] in ("pass", "regression")
    bad = rows["acme/damaged@1"]
    assert bad["verdict"] == "needs_data" and "sha256" in bad["reason"] and "acme/damaged@1" in bad["reason"]
    assert doc["summary"]["needs_data"] == 1 and json.loads(out.read_text()) == doc
    kept = [json.loads(line)["key"] for line in out.with_name("plan.json.partial.jsonl").read_text().splitlines()]
    assert sorted(kept) == ["acme/tags@1", "acme/topic@1", "acme/urgency@1"]
    assert bad["kind"] == rows["acme/urgency@1"]["kind"] == "logreg"
