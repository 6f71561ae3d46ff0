"""LoRA rows inside the shared backbone forward: parity with Hugging Face PEFT, row by row.

Adapters are made and saved by PEFT itself (random A and B, several ranks, alpha, rsLoRA), read
back through headfleet's PEFT loader, put in device slots, and served in one mixed batch with
plain rows. Every adapter row must equal what PEFT gives that text alone with its adapter; every
plain row must equal the frozen backbone.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from headfleet.embedder import Embedder
from headfleet.embedder.onnx_backend import lora_model_file
from headfleet.embedder.lora import module_shapes
from headfleet.errors import AdapterImportError, BackendError
from headfleet.heads.adapters import LoraAdapter
from triton_interpreter import prepare

# The Triton kernels imported so they run on CPU tensors (None) or why they cannot be; before
# peft, which imports triton itself.
_NO_INTERPRETER = None if torch.cuda.is_available() else prepare()
from peft import PeftModel  # noqa: E402  a declared test extra: missing is a collection error, not a skip

TEXTS = [
    "Your parcel is waiting, confirm the delivery fee here",
    "Can we move the meeting to Thursday?",
    "URGENT: the contract clause 4.2 exposes us to unlimited liability",
    "lol ok",
    "I was charged twice for the same order, please refund one of them",
    "The quarterly report is attached.",
    "Win a free cruise now!!! reply YES",
    "Das Paket kommt morgen.",
    "Reset my password please, I am locked out since this morning and need access",
    "thanks",
    "Server room temperature alarm at 3am",
    "Please review the NDA before Friday",
]
# (rank, alpha, use_rslora) per adapter: mixed ranks in one bank, rsLoRA honoured
SPECS = [(1, 2, False), (4, 8, False), (8, 16, False), (16, 8, True), (8, 32, False), (2, 4, True), (8, 8, False),
         (4, 16, False)]


@pytest.fixture(scope="module")
def lora_embedder():
    emb = Embedder.load(max_length=128, batch_size=64, device="cpu")
    emb.enable_lora(max_slots=8, max_rank=16)
    return emb


def _peft_adapters(tmp_path_factory, folder):
    """Eight PEFT adapters with random (non-zero) A and B, saved by PEFT to folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(str(folder)).eval()
    root = tmp_path_factory.mktemp("peft-adapters")
    paths = []
    model = None
    for k, (r, alpha, rs) in enumerate(SPECS):
        torch.manual_seed(100 + k)
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=["query", "value"],
                         init_lora_weights=False, lora_dropout=0.0)
        name = f"a{k}"
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():  # PEFT's random init is small; make the deltas clearly visible
            for mod in model.modules():
                if hasattr(mod, "lora_B") and name in mod.lora_B:
                    mod.lora_B[name].weight.normal_(0, 0.05)
        model.save_pretrained(str(root), selected_adapters=[name])
        paths.append(root / name if (root / name).exists() else root)
    return model.eval(), paths


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory, lora_embedder):
    return _peft_adapters(tmp_path_factory, lora_embedder.folder)


def _peft_alone(model, embedder, text, adapter):
    """PEFT's embedding of ``text`` alone: ``adapter`` active (None: adapters disabled)."""
    enc = embedder.tokenizer.encode(text)
    ids = torch.tensor([enc.ids[: embedder.max_length]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        else:
            model.set_adapter(adapter)
            hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    return embedder.runner.pool(hidden, mask)[0].numpy()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_mixed_batch_matches_peft_row_by_row(lora_embedder, peft_setup, path, monkeypatch):
    """Both product paths: the torch reference (what a CPU serves with) and the fused Triton
    kernel (what a GPU serves with; here under the Triton interpreter, on CPU tensors)."""
    from headfleet.kernels import dispatch

    if path == "triton":
        if _NO_INTERPRETER:  # triton is a declared test extra: its absence is a failure, not a skip
            pytest.fail(_NO_INTERPRETER)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, paths = peft_setup
    shapes = module_shapes(lora_embedder.model)
    bank = lora_embedder.lora
    for slot, folder in enumerate(paths):
        ad = LoraAdapter.from_folder(folder, shapes=shapes)
        assert ad.rank == SPECS[slot][0] and ad.use_rslora == SPECS[slot][2]
        bank.write(slot, ad.torch_weights("cpu"), ad.rank, ad.scale)
    # 8 adapters and plain rows interleaved, texts of different lengths in one forward
    slots = np.array([i % 9 - 1 for i in range(len(TEXTS))] * 2)
    texts = TEXTS * 2
    out = lora_embedder.embed(texts, slots=slots).vectors
    assert dispatch.last_path("lora") == path
    base = lora_embedder.embed(texts).vectors
    for i, (text, s) in enumerate(zip(texts, slots)):
        expected = _peft_alone(model, lora_embedder, text, None if s < 0 else f"a{s}")
        np.testing.assert_allclose(out[i], expected, atol=1e-4, err_msg=f"row {i} slot {s}")
        if s < 0:
            np.testing.assert_array_equal(out[i], base[i])  # plain rows: the frozen backbone, bit for bit
        else:
            assert np.abs(out[i] - base[i]).max() > 1e-3  # the adapter really changed this row


def test_peft_export_round_trips(tmp_path, peft_setup, lora_embedder):
    _, paths = peft_setup
    ad = LoraAdapter.from_folder(paths[2], shapes=module_shapes(lora_embedder.model))
    for name, data in ad.to_files().items():
        (tmp_path / name).write_bytes(data)
    back = LoraAdapter.from_folder(tmp_path)
    assert (back.rank, back.alpha, back.scale) == (ad.rank, ad.alpha, ad.scale)
    for n in ad.A:
        np.testing.assert_array_equal(back.A[n], ad.A[n])
        np.testing.assert_array_equal(back.B[n], ad.B[n])
    # and PEFT itself reads what we wrote: every tensor found (PEFT only warns about missing keys and
    # leaves B = 0, an adapter that does nothing), and PEFT's vectors are ours
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        theirs = PeftModel.from_pretrained(AutoModel.from_pretrained(str(lora_embedder.folder)), str(tmp_path)).eval()
    lora_embedder.lora.write(0, back.torch_weights("cpu"), back.rank, back.scale)
    texts = TEXTS[:6]
    ours = lora_embedder.embed(texts, slots=np.zeros(len(texts), dtype=np.int64)).vectors
    frozen = lora_embedder.embed(texts).vectors
    for i, text in enumerate(texts):
        np.testing.assert_allclose(ours[i], _peft_alone(theirs, lora_embedder, text, "default"), atol=1e-4,
                                   err_msg=text)
        assert np.abs(ours[i] - frozen[i]).max() > 1e-3  # the adapter is not a no-op on either side


def test_adapter_for_another_base_is_refused(tmp_path, peft_setup, lora_embedder, tiny_model_dir):
    _, paths = peft_setup
    shapes = module_shapes(lora_embedder.model)
    cfg = json.loads((paths[0] / "adapter_config.json").read_text())
    # a base-model name that is not this backbone
    cfg["base_model_name_or_path"] = "bert-base-uncased"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes((paths[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterImportError, match="bert-base-uncased"):
        LoraAdapter.from_folder(tmp_path, shapes=shapes, base_names=["sentence-transformers/all-MiniLM-L6-v2"])
    # an adapter whose shapes do not fit (made on a 32-wide BERT) is refused whatever its name says
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    tiny = get_peft_model(AutoModel.from_pretrained(str(tiny_model_dir)),
                          LoraConfig(r=4, target_modules=["query", "value"]))
    tiny.save_pretrained(str(tmp_path / "tiny"))
    with pytest.raises(AdapterImportError, match="another base model|another architecture"):
        LoraAdapter.from_folder(tmp_path / "tiny", shapes=shapes)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("precision", ["fp32", "int8", "w8a8"])
def test_onnx_backbone_serves_lora_rows_inside_its_own_graph(onnx_cache, lora_embedder, peft_setup, precision):
    """On ONNX Runtime (CPU) a mixed batch's adapter rows run one forward of the LoRA graph, each
    with its own delta on top of this precision's base linears; its plain rows run the plain file,
    bit-identical to a batch without adapters. On fp32 adapter rows equal the torch backbone's (so PEFT's); on the
    quantised precisions they stay as close to it as the precision's plain rows do."""
    _, paths = peft_setup
    emb = Embedder.load(max_length=128, batch_size=64, backend="onnx", precision=precision, cache_dir=onnx_cache)
    assert emb.model is None and emb.lora is None  # nothing torch is loaded until a LoRA row needs it
    bank = emb.enable_lora(max_slots=8, max_rank=16)
    assert emb.lora_graph is not None and emb.lora_graph.session is not emb.runner.session
    assert emb.lora_fingerprint != emb.fingerprint and lora_embedder.lora_fingerprint == lora_embedder.fingerprint
    shapes = module_shapes(emb.torch_model())
    for slot, folder in enumerate(paths[:4]):
        ad = LoraAdapter.from_folder(folder, shapes=shapes)
        bank.write(slot, ad.torch_weights("cpu"), ad.rank, ad.scale)
        lora_embedder.lora.write(slot, ad.torch_weights("cpu"), ad.rank, ad.scale)
    slots = np.array([k % 5 - 1 for k in range(len(TEXTS))])  # -1 (plain), 0, 1, 2, 3, -1, ...
    graph, calls = emb.lora_graph, []
    emb.lora_graph = lambda *a: calls.append(a[2].tolist()) or graph(*a)
    mixed = emb.embed(TEXTS, slots=slots).vectors
    assert len(calls) == 1 and sorted(calls[0]) == sorted(slots[slots >= 0].tolist())  # adapter rows, one forward
    emb.lora_graph = graph
    # on w8a8 the adapted linears' biases ride in their outlier Gemm: the delta's Add replaces the
    # bias Add; the other precisions keep one bias Add per adapted linear beside the delta's
    lora_file = onnx.load(str(lora_model_file(emb.runner.path, ["query", "value"])), load_external_data=False)
    reads = {i for n in lora_file.graph.node if n.op_type == "Add" for i in n.input}
    adapted_biases = [i for i in reads if i.endswith((".attention.self.query.bias", ".attention.self.value.bias"))]
    key_biases = [i for i in reads if i.endswith(".attention.self.key.bias")]
    assert len(adapted_biases) == (0 if precision == "w8a8" else 12) and len(key_biases) == 6, adapted_biases
    plain_onnx = emb.embed(TEXTS).vectors
    # an adapter of rank 8 whose A and B are zeros runs the LoRA graph with a zero delta: it must
    # give the plain file's vectors up to this precision's rounding (a bias folded onto the wrong
    # linear, or a widened pick read by the wrong Gemm, would move them far more)
    zero = {k: (torch.zeros_like(a), torch.zeros_like(b)) for k, (a, b) in
            LoraAdapter.from_folder(paths[2], shapes=shapes).torch_weights("cpu").items()}
    bank.write(7, zero, 8, 1.0)
    through_graph = emb.embed(TEXTS, slots=[7] * len(TEXTS)).vectors
    # (quantised: the graph's sums round otherwise, and the int8 steps after them grow that to
    # ~1e-2 a component at most; measured 8.4e-3 on int8, lowest cosine 0.99965 on w8a8)
    assert np.abs(through_graph - plain_onnx).max() <= (1e-6 if precision == "fp32" else 2e-2)
    assert _cosines(through_graph, plain_onnx).min() >= (0.999999 if precision == "fp32" else 0.999)
    plain_torch = lora_embedder.embed(TEXTS).vectors
    on_torch = lora_embedder.embed(TEXTS, slots=slots).vectors
    lora_rows, plain_rows = slots >= 0, slots < 0
    np.testing.assert_array_equal(mixed[plain_rows], plain_onnx[plain_rows])
    assert (np.abs(mixed[lora_rows] - plain_onnx[lora_rows]).max(1) > 1e-3).all()  # every adapter moved its row
    if precision == "fp32":
        np.testing.assert_allclose(mixed[lora_rows], on_torch[lora_rows], atol=1e-5)
    else:  # the delta adds no error of its own: adapter rows lose what plain rows lose, no more
        lora_cos, plain_cos = _cosines(mixed[lora_rows], on_torch[lora_rows]), _cosines(plain_onnx, plain_torch)
        assert lora_cos.min() >= 0.995 and lora_cos.mean() >= plain_cos.mean() - 2e-4, (lora_cos, plain_cos)
    # a row's vector does not depend on its batch: alone, or beside rows of wider-rank adapters
    # (slot 0 holds a rank-1 adapter, slot 3 a rank-16 one)
    for i in np.flatnonzero(lora_rows)[:4]:
        alone = emb.embed([TEXTS[i]], slots=[slots[i]]).vectors[0]
        np.testing.assert_allclose(alone, mixed[i], atol=1e-5)
    # a batch whose rows all carry one adapter gets it once, broadcast: the same vectors as per row
    ones = slots == 2
    together = emb.embed([t for t, one in zip(TEXTS, ones) if one], slots=[2] * int(ones.sum())).vectors
    np.testing.assert_allclose(together, mixed[ones], atol=1e-5)


def test_a_broken_adapter_in_one_slot_cannot_reach_the_other_rows(onnx_cache, peft_setup):
    """An adapter whose weights hold NaN and inf poisons only its own rows: plain rows and rows of
    other adapters in the same forward keep their vectors."""
    _, paths = peft_setup
    emb = Embedder.load(max_length=128, batch_size=64, backend="onnx", precision="w8a8", cache_dir=onnx_cache)
    bank = emb.enable_lora(max_slots=4, max_rank=16)
    shapes = module_shapes(emb.torch_model())
    good = LoraAdapter.from_folder(paths[2], shapes=shapes)
    bank.write(0, good.torch_weights("cpu"), good.rank, good.scale)
    bad = {k: (a.clone().fill_(float("nan")), b.clone().fill_(float("inf"))) for k, (a, b) in good.torch_weights("cpu").items()}
    bank.write(1, bad, good.rank, good.scale)
    slots = np.array([-1, 0, 1, -1, 0, 1])
    texts = TEXTS[:6]
    mixed = emb.embed(texts, slots=slots).vectors
    clean = emb.embed(texts, slots=np.where(slots == 1, -1, slots)).vectors
    np.testing.assert_array_equal(mixed[slots != 1], clean[slots != 1])
    assert np.isnan(mixed[slots == 1]).all()


def test_lora_rows_without_a_bank_are_refused(onnx_cache):
    emb = Embedder.load(max_length=64, backend="onnx", precision="fp32", cache_dir=onnx_cache)
    with pytest.raises(BackendError, match="enable_lora"):
        emb.embed(["a"], slots=[0])


def test_the_graph_serves_what_a_slot_holds_now(onnx_cache, peft_setup):
    """Rewriting a slot with another adapter (or clearing it) takes effect at the next forward:
    the LoRA graph's per-slot copies of the bank never serve the adapter a slot held before."""
    _, paths = peft_setup
    emb = Embedder.load(max_length=128, batch_size=64, backend="onnx", precision="w8a8", cache_dir=onnx_cache)
    bank = emb.enable_lora(max_slots=4, max_rank=16)
    shapes = module_shapes(emb.torch_model())
    first, second = (LoraAdapter.from_folder(paths[k], shapes=shapes) for k in (2, 4))
    texts = TEXTS[:4]
    bank.write(0, first.torch_weights("cpu"), first.rank, first.scale)
    bank.write(1, second.torch_weights("cpu"), second.rank, second.scale)
    with_first = emb.embed(texts, slots=[0] * 4).vectors
    with_second = emb.embed(texts, slots=[1] * 4).vectors
    assert np.abs(with_first - with_second).max() > 1e-3
    bank.write(0, second.torch_weights("cpu"), second.rank, second.scale)  # slot 0 now holds the second
    np.testing.assert_allclose(emb.embed(texts, slots=[0] * 4).vectors, with_second, atol=1e-6)
    bank.clear(0)  # a cleared slot adds nothing: the plain file's vector, to the bit
    np.testing.assert_array_equal(emb.embed(texts, slots=[0] * 4).vectors, emb.embed(texts).vectors)


def test_a_rows_vector_does_not_depend_on_the_ranks_beside_it(onnx_cache, peft_setup, lora_embedder):
    """With the service's default max rank (64): a rank-8 row gives the same vector alone, beside a
    rank-16 row, beside a rank-32 adapter (which runs on the torch copy, as on the torch backbone)
    and in a batch of its own adapter only (broadcast)."""
    from headfleet.embedder.lora_graph import GRAPH_MAX_RANK

    _, paths = peft_setup
    emb = Embedder.load(max_length=128, batch_size=64, backend="onnx", precision="w8a8", cache_dir=onnx_cache)
    bank = emb.enable_lora(max_slots=4, max_rank=64)
    shapes = module_shapes(emb.torch_model())
    r8, r16 = (LoraAdapter.from_folder(paths[k], shapes=shapes) for k in (2, 3))
    assert (r8.rank, r16.rank) == (8, 16) and GRAPH_MAX_RANK >= 16
    rng = np.random.default_rng(3)
    wide = {k: (torch.from_numpy(rng.normal(0, 0.05, (a.shape[0], 32)).astype(np.float32)),
                torch.from_numpy(rng.normal(0, 0.05, (32, b.shape[1])).astype(np.float32)))
            for k, (a, b) in r8.torch_weights("cpu").items()}
    bank.write(0, r8.torch_weights("cpu"), 8, r8.scale)
    bank.write(1, r16.torch_weights("cpu"), 16, r16.scale)
    bank.write(2, wide, 32, 0.5)
    on_torch = Embedder.load(max_length=128, batch_size=64, device="cpu")
    on_torch.enable_lora(max_slots=4, max_rank=64).write(2, wide, 32, 0.5)
    texts = TEXTS[:4]
    alone = np.stack([emb.embed([t], slots=[0]).vectors[0] for t in texts])
    wide_rows = on_torch.embed(texts, slots=[2] * 4).vectors
    for slots in ([0, 1, 0, 1], [0, 2, 0, 2], [0, 0, 0, 0], [0, 1, 2, 0]):
        got = emb.embed(texts, slots=slots).vectors
        rows = np.array(slots) == 0
        np.testing.assert_allclose(got[rows], alone[rows], atol=1e-6, err_msg=str(slots))
        rows = np.array(slots) == 2
        np.testing.assert_allclose(got[rows], wide_rows[rows], atol=1e-5, err_msg=str(slots))


def test_the_lora_graph_is_rebuilt_when_its_base_or_manifest_changed(tmp_path):
    """The LoRA file names the base it was built from: a base rebuilt since (or a LoRA file whose
    manifest a crash never wrote) is built again, and a removed fp32 export is exported again."""
    import os

    from headfleet.embedder.onnx_backend import lora_model_file

    cache = tmp_path / "onnx"
    emb = Embedder.load(max_length=64, backend="onnx", precision="fp32", cache_dir=cache)
    emb.enable_lora(max_slots=2, max_rank=8)
    lora_file = lora_model_file(emb.runner.path, ["query", "value"])
    first = lora_file.stat().st_mtime_ns
    again = Embedder.load(max_length=64, backend="onnx", precision="fp32", cache_dir=cache)
    again.enable_lora(max_slots=2, max_rank=8)
    assert lora_file.stat().st_mtime_ns == first  # reused as it is
    os.utime(emb.runner.path)  # the base "rebuilt" under the same name
    lora_file.with_suffix(".json").unlink()  # and a crash lost the manifest: either one forces a rebuild
    third = Embedder.load(max_length=64, backend="onnx", precision="fp32", cache_dir=cache)
    third.enable_lora(max_slots=2, max_rank=8)
    assert lora_file.stat().st_mtime_ns != first and lora_file.with_suffix(".json").exists()
    # an int8 base whose fp32 export was removed: the LoRA graph still builds (fp32 exported again)
    int8 = Embedder.load(max_length=64, backend="onnx", precision="int8", cache_dir=cache)
    for p in cache.glob("*-fp32-r1.onnx"):
        p.unlink()
    int8.enable_lora(max_slots=2, max_rank=8)
    assert int8.lora_graph is not None and any(cache.glob("*-fp32-r1.onnx"))
