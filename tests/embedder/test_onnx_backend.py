"""The ONNX Runtime backend: parity with torch, int8 and w8a8 within bounds, its own fingerprint, clear errors.

Exports are made once per session into a tmp folder; the MiniLM parity tests run on real texts
from ../shared/data/sms_spam.csv.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from headfleet.cache.keys import content_key
from headfleet.embedder import Embedder, PoolingConfig, fingerprint
from headfleet.embedder.onnx_backend import backend_tag, model_file
from headfleet.errors import ValidationError

N_TEXTS = 800  # sms_spam rows used: the first 500 train a head, the other 300 are the holdout
N_TRAIN = 500
LONG = "The contract renewal terms are attached for review. " * 60  # > 256 tokens: truncated


@pytest.fixture(scope="module")
def onnx_fp32(onnx_cache):
    return Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="fp32",
                         cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def onnx_int8(onnx_cache):
    return Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="int8",
                         cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def onnx_w8a8(onnx_cache):
    return Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="w8a8",
                         cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def sms(sms_spam_path):
    with open(sms_spam_path, newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(N_TEXTS), csv.DictReader(f))]
    return [r["text"] for r in rows], [r["label"] for r in rows]


@pytest.fixture(scope="module")
def torch_vectors(minilm, sms):
    return minilm.embed(sms[0]).vectors


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnx_fp32_matches_torch_on_real_texts(onnx_fp32, torch_vectors, sms, minilm):
    cos = _cos(onnx_fp32.embed(sms[0]).vectors, torch_vectors)
    assert cos.min() >= 0.9999
    both = [minilm.embed([LONG, "x"]).vectors, onnx_fp32.embed([LONG, "x"]).vectors]
    assert _cos(*both).min() >= 0.9999  # truncated and one-token texts too
    np.testing.assert_allclose(np.linalg.norm(both[1], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("precision", ["int8", "w8a8"])
def test_int8_stays_close_and_keeps_head_labels(precision, request, torch_vectors, sms):
    from headfleet.heads import Examples, train_head

    texts, labels = sms
    int8 = request.getfixturevalue(f"onnx_{precision}").embed(texts).vectors
    cos = _cos(int8, torch_vectors)
    assert cos.min() >= 0.99, f"worst text {texts[int(cos.argmin())]!r}: cosine {cos.min():.4f}"

    head = train_head(torch_vectors[:N_TRAIN], Examples(texts[:N_TRAIN], labels[:N_TRAIN], multi_label=False),
                      holdout=0).head
    ref = head.predict_proba(torch_vectors[N_TRAIN:]).argmax(1)
    got = head.predict_proba(int8[N_TRAIN:]).argmax(1)
    assert len(set(ref.tolist())) == 2  # the holdout has both ham and spam
    assert (ref == got).mean() >= 0.98


@pytest.mark.parametrize("precision", ["int8", "w8a8"])
def test_int8_vector_of_a_text_does_not_depend_on_its_batch(precision, request, sms):
    emb = request.getfixturevalue(f"onnx_{precision}")
    texts = sms[0][:24] + [LONG]
    together = emb.embed(texts).vectors
    alone = np.stack([emb.embed([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_w8a8_runs_the_form_this_cpu_adds_exactly_and_both_forms_agree(onnx_w8a8, onnx_cache, sms):
    """u8s8 (int8 weights) only where the CPU adds u8 x s8 in int32; u8u8 elsewhere: same vectors."""
    from headfleet.embedder.onnx_backend import OrtRunner, ensure_model_file
    from headfleet.embedder import w8a8
    from headfleet.settings import cpu_has_int8_dot

    form = "u8s8" if cpu_has_int8_dot() else "u8u8"
    assert onnx_w8a8.runner.path.name.endswith(f"-w8a8v{w8a8.RECIPE}-{form}-r1.onnx")
    source = fingerprint(onnx_w8a8.folder, onnx_w8a8.pooling)
    portable = ensure_model_file(onnx_w8a8.folder, onnx_w8a8.pooling, "w8a8-u8u8", onnx_cache, source)
    texts = sms[0][:48] + [LONG]
    saved = onnx_w8a8.runner
    try:
        onnx_w8a8.runner = OrtRunner(portable)
        u8u8 = onnx_w8a8.embed(texts).vectors
    finally:
        onnx_w8a8.runner = saved
    # the integer sums are the same numbers in either form: on this CPU's own form, equal to float rounding
    np.testing.assert_allclose(onnx_w8a8.embed(texts).vectors, u8u8, atol=1e-6)


def test_w8a8_calibrates_on_the_shipped_texts_and_keeps_outliers_in_fp32(onnx_w8a8, onnx_cache):
    import onnx

    from headfleet.embedder import w8a8

    texts = w8a8.calibration_texts()
    assert len(texts) == 92 + 23 and all(t.strip() for t in texts)  # 3 example CSVs, then joined in fours
    graph = onnx.load(str(onnx_w8a8.runner.path)).graph
    ops = [n.op_type for n in graph.node]
    layers = 6
    # every weight MatMul on the integer GEMM, with its 16 outlier channels added by a small fp32 Gemm;
    # the two attention-score MatMuls per layer stay fp32
    assert ops.count("MatMulIntegerToFloat") == 6 * layers
    # two attention-score MatMuls per layer stay fp32; four more pick each MatMul input's outliers
    assert ops.count("Gemm") == 6 * layers and ops.count("MatMul") == (2 + 4) * layers
    picks = [i for i in graph.initializer if i.name.endswith("_osel")]
    assert len(picks) == 4 * layers
    for init in picks:  # one-hot: each of the 16 outlier columns picks one input channel
        sel = onnx.numpy_helper.to_array(init)
        assert sel.shape[1] == w8a8.OUTLIERS and (sel.sum(0) == 1).all() and set(np.unique(sel)) == {0.0, 1.0}


def test_a_one_hot_gemm_picks_columns_exactly_as_a_gather():
    """The w8a8 graph picks its fp32 outlier columns with a MatMul by a one-hot matrix; on ONNX
    Runtime that equals a Gather to the bit, whatever the values (here spread over 12 decades)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 33, 384)) * 10.0 ** rng.uniform(-6, 6, (7, 33, 384))).astype(np.float32)
    cols = np.sort(rng.choice(384, 16, replace=False))
    sel = np.zeros((384, 16), np.float32)
    sel[cols, np.arange(16)] = 1
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "sel"], ["y"])], "pick",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 384])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(sel, "sel")])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x[..., cols])


def test_the_shipped_backbone_builds_w8a8_from_the_shipped_calibration_which_a_fresh_one_reproduces(
        onnx_w8a8, onnx_cache, tiny_model_dir):
    """Every machine builds the shipped backbone's w8a8 file from the same factors (its own fp32
    kernels would move maxima at rounding edges); the shipped result is what calibrating gives."""
    from headfleet.embedder import w8a8

    source = fingerprint(onnx_w8a8.folder, onnx_w8a8.pooling)
    smooth, outliers = w8a8.shipped(source)
    assert w8a8.shipped(fingerprint(tiny_model_dir, PoolingConfig.from_folder(tiny_model_dir))) is None
    fresh_smooth, fresh_outliers = w8a8.calibrate(model_file(onnx_cache, source, "fp32"), onnx_w8a8.folder)
    assert sorted(smooth) == sorted(fresh_smooth) and len(smooth) == 4 * 6
    for name in smooth:
        np.testing.assert_allclose(smooth[name], fresh_smooth[name], rtol=1e-3)
        assert set(outliers[name].tolist()) == set(fresh_outliers[name].tolist()), name


def test_a_precision_without_a_conversion_is_refused_not_built(onnx_fp32, onnx_cache):
    from headfleet.embedder.onnx_backend import ensure_model_file
    from headfleet.errors import BackendError

    with pytest.raises(BackendError, match="no ONNX conversion for precision 'bf16'"):
        ensure_model_file(onnx_fp32.folder, onnx_fp32.pooling, "bf16", onnx_cache,
                          fingerprint(onnx_fp32.folder, onnx_fp32.pooling))
    assert not list(onnx_cache.glob("*-bf16-*"))


def test_each_backend_and_precision_has_its_own_fingerprint_and_cache_namespace(minilm, onnx_fp32, onnx_int8,
                                                                              onnx_w8a8):
    assert minilm.fingerprint == fingerprint(minilm.folder, minilm.pooling)  # the default stays torch-fp32
    assert (minilm.backend, minilm.precision) == ("torch", "fp32")
    every = (minilm, onnx_fp32, onnx_int8, onnx_w8a8)
    assert len({e.fingerprint for e in every}) == 4
    assert onnx_int8.fingerprint == fingerprint(minilm.folder, minilm.pooling, backend_tag("onnx", "int8"))
    assert onnx_w8a8.fingerprint == fingerprint(minilm.folder, minilm.pooling, backend_tag("onnx", "w8a8"))
    keys = {content_key(e.fingerprint, "tenant-a", 256, "free entry") for e in every}
    assert len(keys) == 4
    # what does not change the vectors does not change the fingerprint
    assert onnx_fp32.dim == onnx_int8.dim == minilm.dim and minilm.tokenizer_hash == onnx_int8.tokenizer_hash


def test_token_counts_and_truncation_are_the_same_on_every_backend(minilm, onnx_fp32, onnx_int8, onnx_w8a8, sms):
    texts = sms[0][:40] + [LONG, "\u2603\u2604 \u2605", "x"]
    ref = minilm.embed(texts)
    assert ref.truncated_count == 1
    for e in (onnx_fp32, onnx_int8, onnx_w8a8):
        out = e.embed(texts)
        np.testing.assert_array_equal(out.n_tokens, ref.n_tokens)
        np.testing.assert_array_equal(out.truncated, ref.truncated)
        counts, ref_counts = e.count_tokens(texts), minilm.count_tokens(texts)
        np.testing.assert_array_equal(counts.n_unk, ref_counts.n_unk)
        np.testing.assert_array_equal(counts.truncated, ref_counts.truncated)


def test_forwards_and_texts_embedded_are_counted(onnx_fp32):
    before_f, before_t = onnx_fp32.forwards, onnx_fp32.texts_embedded
    onnx_fp32.embed(["a"] * 40)  # batch_size 32: two forwards
    assert (onnx_fp32.forwards - before_f, onnx_fp32.texts_embedded - before_t) == (2, 40)
    assert onnx_fp32.embed([]).vectors.shape == (0, onnx_fp32.dim)


def test_the_export_is_cached_by_source_fingerprint_with_a_manifest(onnx_fp32, onnx_int8, onnx_w8a8, onnx_cache):
    source = fingerprint(onnx_fp32.folder, onnx_fp32.pooling)
    for e in (onnx_fp32, onnx_int8, onnx_w8a8):
        path = e.runner.path
        assert path == model_file(onnx_cache, source, e.precision)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["source_fingerprint"] == source and meta["precision"] == e.precision
    assert not [p for p in onnx_cache.iterdir() if ".tmp" in p.name]  # no half-written leftovers
    mtime = onnx_int8.runner.path.stat().st_mtime_ns
    again = Embedder.load(device="cpu", backend="onnx", precision="int8", cache_dir=onnx_cache, graph_opt="disabled")
    assert again.runner.path.stat().st_mtime_ns == mtime  # reused, not re-exported
    # fusions move int8 vectors a little (quantisation steps), so another level is another fingerprint
    assert again.fingerprint == fingerprint(again.folder, again.pooling, "onnx-int8-opt-disabled")
    assert again.fingerprint != onnx_int8.fingerprint
    texts = ["Free entry in 2 a wkly comp", "Ok lar... Joking wif u oni..."]
    assert _cos(again.embed(texts).vectors, onnx_int8.embed(texts).vectors).min() >= 0.998


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_another_backbone_gets_its_own_export_and_its_pooling(tiny_model_dir, tmp_path, onnx_cache, mode):
    folder = tmp_path / f"tiny-{mode}"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(pooling_mode_mean_tokens=mode == "mean", pooling_mode_cls_token=mode == "cls")
    cfg_path.write_text(json.dumps(cfg))
    assert PoolingConfig.from_folder(folder).mode == mode

    texts = ["hello world", "a somewhat longer sentence with more tokens in it", LONG]
    ref = Embedder.load(folder, max_length=64, device="cpu")
    for precision, bound in (("fp32", 0.9999), ("int8", 0.99), ("w8a8", 0.99)):
        ours = Embedder.load(folder, max_length=64, device="cpu", backend="onnx", precision=precision,
                             cache_dir=onnx_cache)
        assert ours.runner.path.name.startswith(fingerprint(folder, ref.pooling)[:32])
        assert ours.fingerprint != ref.fingerprint
        assert _cos(ours.embed(texts).vectors, ref.embed(texts).vectors).min() >= bound


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="tensorrt"), "unknown backend"),
    (dict(backend="onnx", precision="int4"), "precision 'int4'"),
    (dict(backend="torch", precision="int8"), "not available on the torch backend"),
    (dict(backend="onnx", precision="fp16", device="cpu"), "fp16 needs a cuda device"),
    (dict(backend="onnx", precision="int8", device="cuda"), "int8 runs on the CPU only"),
    (dict(backend="onnx", precision="w8a8", device="cuda"), "w8a8 runs on the CPU only"),
    (dict(backend="torch", precision="w8a8"), "not available on the torch backend"),
    (dict(backend="onnx", graph_opt="max"), "graph optimisation level"),
])
def test_bad_backend_or_precision_is_a_validation_error(kwargs, match, onnx_cache):
    with pytest.raises(ValidationError, match=match):
        Embedder.load(cache_dir=onnx_cache, **kwargs)


def test_the_fp16_file_keeps_the_vectors(onnx_fp32, onnx_cache, sms, torch_vectors):
    """The fp16 conversion, run here on the CPU provider; the service runs fp16 on CUDA only."""
    from headfleet.embedder.onnx_backend import OrtRunner, ensure_model_file

    path = ensure_model_file(onnx_fp32.folder, onnx_fp32.pooling, "fp16", onnx_cache,
                             fingerprint(onnx_fp32.folder, onnx_fp32.pooling))
    fp16 = OrtRunner(path, device="cpu")
    saved = onnx_fp32.runner
    try:
        onnx_fp32.runner = fp16
        vectors = onnx_fp32.embed(sms[0][:64]).vectors
    finally:
        onnx_fp32.runner = saved
    assert vectors.dtype == np.float32
    assert _cos(vectors, torch_vectors[:64]).min() >= 0.999


def test_fp16_on_cuda(onnx_cache, sms, torch_vectors):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDAExecutionProvider (onnxruntime-gpu) on this machine")
    fp16 = Embedder.load(device="cuda", backend="onnx", precision="fp16", cache_dir=onnx_cache)
    cos = _cos(fp16.embed(sms[0]).vectors, torch_vectors)
    assert cos.min() >= 0.999


def test_a_w8a8_file_that_computes_wrong_vectors_is_refused_at_build_time(onnx_w8a8, onnx_cache, tmp_path):
    """The self-check guards the contract the graph leans on (a per-token scale in
    MatMulIntegerToFloat): a file whose integer weights are garbled fails it with a clear error."""
    import onnx
    from onnx import numpy_helper

    from headfleet.embedder import w8a8

    source = fingerprint(onnx_w8a8.folder, onnx_w8a8.pooling)
    fp32 = model_file(onnx_cache, source, "fp32")
    batches = w8a8.calibration_batches(onnx_w8a8.folder)[:2]
    assert w8a8.self_check(fp32, onnx_w8a8.runner.path, batches) >= 0.99
    model = onnx.load(str(onnx_w8a8.runner.path))
    for init in model.graph.initializer:  # every integer weight reversed along its rows
        if init.name.endswith("_w"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ValueError, match="fails its self-check against fp32"):
        w8a8.self_check(fp32, broken, batches)
