"""LoRA classifiers end to end in the engine: train, import from PEFT, serve beside heads, cache, churn.

The backbone here is its own instance (module scope) so the adapter bank's slot count is the one
each test asks for, not whatever another test module set up.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from headfleet.embedder import Embedder
from headfleet.embedder.lora_train import LoraTrainConfig
from headfleet.errors import AdapterImportError
from headfleet.heads import examples_from_records, load_examples
from headfleet.heads.adapters import LoraAdapter
from headfleet.heads.types import HeadArrays
from headfleet.engine import Engine
from headfleet.settings import Settings

TEXTS = ["Free entry in a weekly competition to win FA Cup final tickets, text FA to 87121",
         "Ok lar... Joking wif u oni...", "I'll call you when I get home", "URGENT! You have won a 1 week FREE membership",
         "Are we still on for dinner tonight?", "Call now to claim your prize, reply STOP to end",
         "see you at 5", "Your account has been credited with 500 pounds, click the link"]


@pytest.fixture(scope="module")
def backbone():
    return Embedder.load(max_length=128, batch_size=32, device="cpu")


def _engine(backbone, tmp_path, **kw):
    return Engine.open(Settings(data_dir=tmp_path / "data", device="cpu", **kw), embedder=backbone)


@pytest.fixture(scope="module")
def sms(sms_spam_path):
    return load_examples(sms_spam_path)


def _subset(examples, n, seed=0):
    rng = random.Random(seed)
    idx = rng.sample(range(len(examples)), n)
    return examples_from_records([{"text": examples.texts[i], "label": examples.labels[i]} for i in idx])


def test_trained_lora_classifier_serves_beside_a_head_and_caches_in_its_own_namespace(backbone, tmp_path, sms):
    eng = _engine(backbone, tmp_path)
    data = _subset(sms, 240)
    eng.train("acme", "spam-head", data)
    manifest = eng.train_lora("acme", "spam-lora", data, config=LoraTrainConfig(epochs=2, rank=4, alpha=8))
    adapter = manifest["adapter"]
    assert adapter["rank"] == 4 and adapter["source"] == "trained" and adapter["targets"] == ["query", "value"]
    folder = eng.registry.version_dir("acme", manifest)
    # the version holds only the adapter (PEFT files), the head and the data: no backbone copy
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                    "weights.safetensors", "manifest.json"}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    assert manifest["parent_fingerprint"] == backbone.fingerprint
    metrics = manifest["metrics"]
    assert metrics["accuracy"] == metrics["holdout_accuracy"]  # the name retrain reports, as for heads
    _assert_the_adapter_learned(backbone, folder, metrics, TEXTS)

    out = eng.classify("acme", TEXTS, ["spam-head", "spam-lora"])
    assert out["cache"]["computed"] == 2 * len(TEXTS)  # one embedding per namespace per text
    expected = {0: "spam", 1: "ham", 2: "ham", 3: "spam", 4: "ham", 5: "spam", 6: "ham"}  # row 7 is debatable
    for i, r in enumerate(out["results"]):
        c = r["classifications"]
        assert list(c) == ["spam-head", "spam-lora"]
        if i in expected:
            assert c["spam-lora"]["label"] == expected[i], TEXTS[i]
    again = eng.classify("acme", TEXTS, ["spam-lora"])
    assert again["cache"]["computed"] == 0 and again["cache"]["hits"]["memory"] == len(TEXTS)
    np.testing.assert_allclose([r["classifications"]["spam-lora"]["scores"]["spam"] for r in again["results"]],
                               [r["classifications"]["spam-lora"]["scores"]["spam"] for r in out["results"]], atol=1e-6)
    # the adapter's embedding is not the shared one: the head tenant's cache entry is not reused
    other = eng.classify("acme", ["a text only the lora classifier saw"], ["spam-lora"])
    assert other["cache"]["computed"] == 1
    assert eng.classify("acme", ["a text only the lora classifier saw"], ["spam-head"])["cache"]["computed"] == 1
    eng.close()


def _assert_the_adapter_learned(backbone, folder, metrics: dict, texts: list[str]) -> None:
    """Training kept an epoch after the start (epoch 0 is the frozen head with B = 0, so "holdout
    accuracy >= frozen" holds for an adapter that learned nothing), the saved B is not zero, and the
    adapter moves the embeddings of real texts away from the frozen ones."""
    assert metrics["best_epoch"] >= 1, metrics["history"]
    saved = LoraAdapter.from_folder(folder)
    assert max(float(np.abs(b).max()) for b in saved.B.values()) > 0, "every B of the saved adapter is zero"
    moved = 1.0 - (_merged_reference(backbone, saved, texts) * backbone.embed(texts).vectors).sum(1)
    assert moved.min() > 1e-4, f"the adapter leaves some embeddings where the frozen backbone puts them: {moved}"


# Who acts on whom: every text holds one boss word and one staff word, in either order, so the two
# classes have the same bag of words. A head on frozen mean-pooled embeddings barely beats a coin;
# an adapter on query/value can learn the order.
BOSSES = ["the manager", "the director", "the chief", "the boss", "the owner", "the chairman", "the supervisor",
          "the head nurse"]
STAFF = ["the intern", "the clerk", "the cleaner", "the trainee", "the driver", "the cashier", "the porter",
         "the waiter"]
VERBS = ["thanked", "called", "paid", "warned", "praised", "hired", "blamed", "emailed", "visited", "helped"]


def _who_acts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        boss, staff, verb = rng.choice(BOSSES), rng.choice(STAFF), rng.choice(VERBS)
        if rng.random() < 0.5:
            rows.append({"text": f"{boss} {verb} {staff}", "label": "boss_acts"})
        else:
            rows.append({"text": f"{staff} {verb} {boss}", "label": "staff_acts"})
    return rows


def test_lora_beats_a_frozen_head_where_the_frozen_embedding_is_weak(backbone, tmp_path):
    eng = _engine(backbone, tmp_path)
    train, unseen = _who_acts(320, seed=0), _who_acts(200, seed=99)
    data = examples_from_records(train)
    eng.train("acme", "who-head", data)
    manifest = eng.train_lora("acme", "who-lora", data, config=LoraTrainConfig(epochs=3, rank=4, alpha=8, lr=3e-3))
    metrics = manifest["metrics"]
    _assert_the_adapter_learned(backbone, eng.registry.version_dir("acme", manifest), metrics,
                                [r["text"] for r in unseen[:8]])
    assert metrics["holdout_accuracy"] >= metrics["frozen_holdout_accuracy"] + 0.2, metrics["history"]
    # and on 200 texts neither training saw, through the serving path
    out = eng.classify("acme", [r["text"] for r in unseen], ["who-head", "who-lora"])
    acc = {c: np.mean([res["classifications"][c]["label"] == r["label"] for res, r in zip(out["results"], unseen)])
           for c in ("who-head", "who-lora")}
    assert acc["who-head"] <= 0.75 and acc["who-lora"] >= 0.9 and acc["who-lora"] >= acc["who-head"] + 0.2, acc
    eng.close()


def test_peft_adapter_imports_and_serves_what_peft_computes(backbone, tmp_path, sms):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(3)
    model = get_peft_model(AutoModel.from_pretrained(str(backbone.folder)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False))
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.normal_(0, 0.05)
    model.eval().save_pretrained(str(tmp_path / "peft"))
    eng = _engine(backbone, tmp_path)
    manifest = eng.train_lora("acme", "imported", _subset(sms, 120), adapter_dir=tmp_path / "peft")
    assert manifest["adapter"]["source"] == "imported"
    _, head = eng.registry.load("acme", "imported")
    out = eng.classify("acme", TEXTS[:4], ["imported"])
    for text, r in zip(TEXTS[:4], out["results"]):
        enc = backbone.tokenizer.encode(text)
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           token_type_ids=torch.zeros_like(ids)).last_hidden_state
        vec = backbone.runner.pool(hidden, torch.ones_like(ids)).numpy()
        expected = head.predict_proba(vec)[0]
        got = [r["classifications"]["imported"]["scores"][lab] for lab in head.labels]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    # an adapter for another base model is refused, saying why, and nothing is saved
    cfg = (tmp_path / "peft" / "adapter_config.json")
    cfg.write_text(cfg.read_text().replace(str(backbone.folder), "google-bert/bert-base-uncased"))
    with pytest.raises(AdapterImportError, match="bert-base-uncased"):
        eng.train_lora("acme", "foreign", _subset(sms, 60), adapter_dir=tmp_path / "peft")
    assert [c["name"] for c in eng.registry.list("acme")] == ["imported"]
    eng.close()


def _random_adapter(rng: np.random.Generator, shapes: dict, rank: int) -> LoraAdapter:
    names = [n for n in shapes if n.endswith((".query", ".value"))]
    A = {n: rng.normal(0, 0.05, (shapes[n][0], rank)).astype(np.float32) for n in names}
    B = {n: rng.normal(0, 0.05, (rank, shapes[n][1])).astype(np.float32) for n in names}
    return LoraAdapter(rank=rank, alpha=2.0 * rank, use_rslora=False, targets=["query", "value"], A=A, B=B)


def _merged_reference(backbone, adapter: LoraAdapter, texts: list[str]) -> np.ndarray:
    """An independent path: merge W' = W + scale * (A @ B)^T into the weights, run the plain model."""
    layers = backbone.lora.layers
    saved = {}
    with torch.no_grad():
        for name in adapter.A:
            w = layers[name].base.weight
            saved[name] = w.clone()
            w += adapter.scale * torch.from_numpy(adapter.A[name] @ adapter.B[name]).T
        try:
            vecs = backbone.embed(texts).vectors
        finally:
            for name, w in saved.items():
                layers[name].base.weight.copy_(w)
    return vecs


def test_a_thousand_adapters_behind_four_slots_answer_a_random_tenant_stream_right(tmp_path):
    backbone = Embedder.load(max_length=128, batch_size=32, device="cpu")  # its own bank of 4 slots
    eng = _engine(backbone, tmp_path, lora_slots=4, lora_max_rank=8, lora_max_loaded=64)
    manager = eng.adapter_manager()
    assert manager.max_slots == 4
    from headfleet.embedder.lora import module_shapes

    shapes = module_shapes(backbone.model)
    rng = np.random.default_rng(7)
    data = examples_from_records([{"text": t, "label": lab} for t, lab in zip(TEXTS, "abcabcab")])
    adapters, heads = {}, {}
    for k in range(1000):
        tenant = f"t{k:04d}"
        adapters[tenant] = _random_adapter(rng, shapes, rank=int(rng.choice([1, 2, 4, 8])))
        heads[tenant] = HeadArrays("logreg", ["a", "b", "c"], False, rng.normal(0, 4, (3, 384)), rng.normal(0, 1, 3))
        eng.save_lora(tenant, "mine", adapters[tenant], heads[tenant], data)
    texts = TEXTS[:4]
    # 240 requests; a third of them from a few busy tenants (repeats: slot and cache hits), the rest anyone
    busy = [f"t{k:04d}" for k in rng.choice(1000, 5, replace=False)]
    stream = [(busy[int(rng.integers(5))] if rng.random() < 0.33 else f"t{int(rng.integers(1000)):04d}",
               int(rng.integers(len(texts)))) for _ in range(240)]
    reference: dict[tuple[str, int], np.ndarray] = {}
    for tenant in dict.fromkeys(t for t, _ in stream):
        asked = sorted({j for t, j in stream if t == tenant})
        vecs = _merged_reference(backbone, adapters[tenant], [texts[j] for j in asked])
        for row, j in enumerate(asked):
            reference[(tenant, j)] = heads[tenant].predict_proba(vecs[row: row + 1])[0]
    # batches of 24 requests from random tenants, their misses embedded together as the scheduler does
    wrong = 0
    for start in range(0, len(stream), 24):
        reqs = stream[start: start + 24]
        resolved = {t: eng.resolve(t, ["mine"]) for t, _ in reqs}
        preps = [eng.prepare(t, [texts[j]], ns=eng.plan(t, resolved[t])[0][0]) for t, j in reqs]
        keys, todo, spaces = [], [], []
        for p in preps:
            for key, rows in p.todo.items():
                if key not in keys:
                    keys.append(key)
                    todo.append(p.norm[rows[0]])
                    spaces.append(p.namespace)
        answers = eng.fill(keys, todo, spaces).answers(keys)
        for (tenant, j), prep in zip(reqs, preps):
            out = eng.score(eng.finish(prep, {k: answers[k] for k in prep.todo}), resolved[tenant])
            scores = out["results"][0]["classifications"]["mine"]["scores"]
            got = np.array([scores[lab] for lab in "abc"])
            wrong += not np.allclose(got, reference[(tenant, j)], atol=1e-4)
    assert wrong == 0
    snap = manager.snapshot()
    assert snap["slot_evictions"] > 100 and snap["loaded"] <= 64  # churned through slots and host memory
    assert snap["slots_used"] <= 4 and snap["pinned"] == 0  # nothing left pinned after the batches
    eng.close()


def test_retrain_on_another_backbone_trains_a_lora_version_again_with_its_recorded_settings(
        tiny_model_dir, sms, tmp_path):
    """A backbone switch makes a LoRA version stale; ``retrain`` trains its adapter again with the
    rank, alpha and epochs it was trained with, not the defaults."""
    import shutil

    from transformers import BertModel

    other = tmp_path / "tiny-patched"  # the same architecture with one weight changed: another fingerprint
    shutil.copytree(tiny_model_dir, other)
    model = BertModel.from_pretrained(other)
    with torch.no_grad():
        model.pooler.dense.bias += 0.01
    model.save_pretrained(other)
    old = Embedder.load(tiny_model_dir, max_length=64, batch_size=32, device="cpu")
    new = Embedder.load(other, max_length=64, batch_size=32, device="cpu")
    assert old.fingerprint != new.fingerprint
    data = _subset(sms, 60, seed=4)
    with _engine(old, tmp_path) as eng:
        first = eng.train_lora("acme", "spam", data, seed=2, config=LoraTrainConfig(epochs=1, rank=4, alpha=6, seed=2))
    with _engine(new, tmp_path) as eng:
        done = eng.retrain("acme")
        assert [(d["classifier"], d["status"], d["lora_config"]) for d in done] == [("spam", "retrained", "recorded")]
        again = eng.registry.resolve("acme", "spam")
    assert again["version"] == 2 and again["parent_fingerprint"] == new.fingerprint
    assert again["adapter"]["rank"] == 4 and again["adapter"]["train_config"]["alpha"] == 6
    assert again["adapter"]["train_config"] == first["adapter"]["train_config"]
    assert again["retrained_from"]["version"] == 1


def test_lora_classifier_trains_and_serves_on_the_onnx_backbone(onnx_cache, tmp_path, sms):
    """The ONNX Runtime backbone (the default for new data folders) carries LoRA tenants: the
    adapter trains on its torch copy and serves in the LoRA graph, beside head classifiers on the
    plain graph."""
    onnx = Embedder.load(max_length=128, batch_size=32, device="cpu", backend="onnx", precision="fp32",
                         cache_dir=onnx_cache)
    eng = Engine.open(Settings(data_dir=tmp_path / "data", device="cpu", backend="onnx"), embedder=onnx)
    data = _subset(sms, 240)
    eng.train("acme", "spam-head", data)
    manifest = eng.train_lora("acme", "spam-lora", data, config=LoraTrainConfig(epochs=2, rank=4, alpha=8))
    assert manifest["parent_fingerprint"] == onnx.fingerprint
    out = eng.classify("acme", TEXTS, ["spam-head", "spam-lora"])
    assert out["cache"]["computed"] == 2 * len(TEXTS)
    lora_labels = [r["classifications"]["spam-lora"]["label"] for r in out["results"]]
    head_labels = [r["classifications"]["spam-head"]["label"] for r in out["results"]]
    assert lora_labels[:7] == ["spam", "ham", "ham", "spam", "ham", "spam", "ham"]
    assert sum(a == b for a, b in zip(lora_labels, head_labels)) >= 6
    again = eng.classify("acme", TEXTS, ["spam-lora"])
    assert again["cache"]["computed"] == 0  # the adapter's vectors were cached in its own namespace
    eng.close()


def test_a_texts_cache_covers_every_embedding_it_needed(backbone, tmp_path, random_lora):
    """A text asked of a head and LoRA classifiers needs one embedding per namespace. Its ``cache``
    names a tier only when every one was held, says "miss" only when every one was computed and
    "partial" otherwise; the request's counters count embeddings and stay consistent with it."""
    eng = _engine(backbone, tmp_path)
    data = examples_from_records([{"text": t, "label": lab} for t, lab in zip(TEXTS, ["spam", "ham"] * 4)])
    eng.train("acme", "head", data)
    random_lora(eng, "acme", "lora", seed=1)
    random_lora(eng, "acme", "lora2", seed=2)
    plain_held, lora_held, neither = "held for the head only", "held for the adapter only", "held for nobody"
    eng.classify("acme", [plain_held], ["head"])
    eng.classify("acme", [lora_held], ["lora"])
    both = ["head", "lora"]
    out = eng.classify("acme", [plain_held, lora_held, neither], both)
    assert [r["cache"] for r in out["results"]] == ["partial", "partial", "miss"]
    assert out["cache"] == {"hits": {"memory": 2, "local": 0, "redis": 0}, "misses": 4, "computed": 4}
    again = eng.classify("acme", [plain_held, lora_held, neither], both)
    assert [r["cache"] for r in again["results"]] == ["memory"] * 3 and again["cache"]["computed"] == 0
    # three embeddings, two of them held
    three = eng.classify("acme", [plain_held], ["head", "lora", "lora2"])
    assert three["results"][0]["cache"] == "partial"
    assert three["cache"] == {"hits": {"memory": 2, "local": 0, "redis": 0}, "misses": 1, "computed": 1}
    # one embedding per text: as before, a tier or "miss"
    one = eng.classify("acme", [plain_held, "brand new"], ["lora2"])
    assert [r["cache"] for r in one["results"]] == ["memory", "miss"]
    eng.close()


def test_reading_an_adapter_at_resolution_is_its_own_phase_in_timing(backbone, tmp_path, random_lora):
    """The first request naming a LoRA version reads and checks its adapter before anything is
    embedded; that time is ``timing_ms["adapter_load"]``, 0 for requests that read none."""
    eng = _engine(backbone, tmp_path)
    random_lora(eng, "acme", "lora")
    eng.train("acme", "head", examples_from_records([{"text": t, "label": lab}
                                                     for t, lab in zip(TEXTS, ["spam", "ham"] * 4)]))
    head_only = eng.classify("acme", ["a text"], ["head"])["timing_ms"]
    assert list(head_only)[0] == "adapter_load" and head_only["adapter_load"] == 0
    first = eng.classify("acme", ["a text"], ["head", "lora"])["timing_ms"]
    assert first["adapter_load"] > 0 and set(first) >= {"cache", "embed", "heads"}
    assert eng.classify("acme", ["another text"], ["lora"])["timing_ms"]["adapter_load"] == 0  # read once
    eng.close()


def test_the_first_lora_request_on_onnx_shows_the_torch_copys_load_in_adapter_load(minilm, onnx_cache, tmp_path,
                                                                                   random_lora):
    """After a restart on ONNX Runtime the first LoRA request loads the backbone's torch copy while
    resolving (seconds): the whole of that load is inside ``timing_ms["adapter_load"]``."""
    onnx = Embedder.load(max_length=128, batch_size=32, device="cpu", backend="onnx", precision="fp32",
                         cache_dir=onnx_cache)  # a fresh one: its torch copy is not loaded yet
    eng = Engine.open(Settings(data_dir=tmp_path / "data", device="cpu", backend="onnx"), embedder=onnx)
    random_lora(eng, "acme", "lora", torch_backbone=minilm)  # published for this backbone, nothing loaded
    real, spent = onnx.torch_model, []

    def timed_torch_model():  # the real load, timed from the inside
        t0 = time.perf_counter()
        try:
            return real()
        finally:
            spent.append((time.perf_counter() - t0) * 1e3)

    onnx.torch_model = timed_torch_model
    assert onnx.lora_runner is None
    first = eng.classify("acme", ["Claim your free prize now"], ["lora"])["timing_ms"]
    assert onnx.lora_runner is not None and onnx.lora_graph is not None  # both opened by this request
    assert first["adapter_load"] >= round(spent[0], 3) - 0.001  # the first call is the load, at resolution
    assert eng.classify("acme", ["See you at lunch"], ["lora"])["timing_ms"]["adapter_load"] == 0
    eng.close()


def test_warm_lora_loads_the_torch_copy_before_traffic_only_where_a_lora_classifier_exists(minilm, onnx_cache,
                                                                                         tmp_path, random_lora):
    """The service calls ``warm_lora`` at start: on ONNX Runtime a folder with a LoRA classifier gets
    the backbone's torch copy before its first request (which then reads only the adapter), and a
    folder without one does not pay ~90 MB for it."""
    def fresh():
        return Embedder.load(max_length=128, batch_size=32, device="cpu", backend="onnx", precision="fp32",
                             cache_dir=onnx_cache)

    plain = Engine.open(Settings(data_dir=tmp_path / "plain", device="cpu", backend="onnx"), embedder=fresh())
    assert plain.warm_lora() is False and plain.embedder.lora_runner is None
    plain.close()

    data = tmp_path / "data"
    eng = Engine.open(Settings(data_dir=data, device="cpu", backend="onnx"), embedder=fresh())
    random_lora(eng, "acme", "lora", torch_backbone=minilm)
    eng.close()
    onnx = fresh()
    eng = Engine.open(Settings(data_dir=data, device="cpu", backend="onnx"), embedder=onnx)  # a restart
    assert onnx.lora_runner is None
    assert eng.warm_lora() is True and onnx.lora_runner is not None
    runner = onnx.lora_runner
    out = eng.classify("acme", ["Claim your free prize now"], ["lora"])
    assert out["results"][0]["classifications"]["lora"]["label"] in ("ham", "spam")
    assert onnx.lora_runner is runner  # the first request used the copy loaded at start
    eng.close()
