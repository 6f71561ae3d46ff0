"""``w8a8``: per-token int8 activations x per-column int8 weights on ONNX Runtime's integer GEMM.

The ONNX precision a new data folder gets on a CPU with an int8 dot product (AVX-512 VNNI,
AVX-VNNI, AMX). Built from the fp32 export once, at first use, like the other precisions.

Every weight MatMul ``Y = X W + b`` of the fp32 graph (X: [batch, seq, K], W: [K, N]) becomes

    X' = X / s                      s: [K], SmoothQuant's per-channel smoothing, fixed at build time
    W' = s[:, None] * W             so X' W' = X W before rounding
    O  = the 16 input channels with the widest calibrated max|X'|, kept in fp32 (LLM.int8())
    scale_t = max|X'_t| / 127       one scale per token t (a row of X', O zeroed), at run time;
                                    asymmetric (min..max, a zero point per token) on the FFN
                                    down-projection, whose input comes out of GELU (>= -0.17)
    Y = int8_gemm(q(X'), Wq) * scale_t * scale_w  +  X[..., O] W[O, :]  + b
                                    (the fp32 share added by one Gemm into the integer output)

Sources: smoothing ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)`` (Xiao et al., "SmoothQuant",
ICML 2023, eq. 4; alpha 0.5); per-token activation scales (Yao et al., "ZeroQuant", NeurIPS 2022);
outlier channels kept in floating point (Dettmers et al., "LLM.int8()", NeurIPS 2022), here a set
fixed at calibration rather than found per batch.

**Batch independence.** Every scale belongs to one token or one weight column, the outlier set is
fixed, and the integer product is exact, so a text's vector does not depend on the other texts of
its batch: a content-addressed cache needs that (``quantize_dynamic``'s one scale per batch tensor
fails it).

**Two forms, the same integer sums.** ONNX Runtime's fast uint8 x int8 kernel (``u8s8``) adds its products in
int32 on a CPU with VNNI, but through AVX2's saturating 16-bit ``VPMADDUBSW`` without it, where
8-bit weights overflow. So the file is built in one of two forms with the same integer arithmetic:
``u8s8`` (int8 weights) where the CPU has an int8 dot product, ``u8u8`` (weights offset by 128,
zero point 128: exact everywhere, slower) elsewhere. Built from the same calibration, both give
the same vectors (bit-identical on the machine that measured it), so they share one fingerprint.

**Calibration** runs the fp32 graph on headfleet's own example texts (``engine/example_data``, 92
short texts, plus the same texts joined four at a time) and records each MatMul input's
per-channel maximum. The maxima come out of fp32 kernels that differ in their last bits from one
CPU (or ONNX Runtime version) to another, and a maximum at a rounding edge moves a smoothing factor
and then the vectors, by up to ~5e-3 a component. So for the shipped backbone the calibration's
result ships with the package (``w8a8_minilm.npz``: the factors and outlier channels, by source
fingerprint) and every machine builds the same file from it: the weights' quantisation is exact
IEEE arithmetic from there on. Another backbone is calibrated where its file is built: build it
once and share the ONNX folder (``<data>/onnx``) between the machines that share a cache.
``RECIPE`` is in the file name; changing these texts, constants or the shipped result needs a new
``RECIPE`` and, as it changes the vectors, a new precision name.

Measured (README, "Backends"): 2.1x sentence-transformers on SMS and news texts, every head of
``bench/parity.py`` >= 99 % label agreement with torch fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ALPHA = 0.5  # SmoothQuant's migration strength
OUTLIERS = 16  # input channels per MatMul input kept in fp32
W_BITS = 8
FORMS = ("u8s8", "u8u8")
JOIN = 4  # calibration: the example texts also joined this many at a time
RECIPE = 2  # in the file name (``w8a8v2-u8s8``): bump with any change to the above, the shipped result or
# the graph (v2: outlier columns picked by a one-hot GEMM instead of a Gather; the same vectors to the bit)
SHIPPED = "w8a8_minilm.npz"  # the shipped backbone's calibration result (write_shipped)


def form_for_this_cpu() -> str:
    """``"u8s8"`` where the CPU adds u8 x s8 products in int32 (an int8 dot product), else ``"u8u8"``."""
    from headfleet.settings import cpu_has_int8_dot

    return "u8s8" if cpu_has_int8_dot() else "u8u8"


def form_of(precision: str) -> str | None:
    """The file form a precision name asks for: ``"w8a8"`` -> this CPU's, ``"w8a8-u8u8"`` -> that
    one; None for any other precision."""
    if precision == "w8a8":
        return form_for_this_cpu()
    if precision.startswith("w8a8-") and precision[5:] in FORMS:
        return precision[5:]
    return None


def calibration_texts() -> list[str]:
    """The texts calibration runs: the example classifiers' training texts, then joined in fours."""
    import csv
    from importlib import resources

    texts: list[str] = []
    folder = resources.files("headfleet.engine") / "example_data"
    for name in sorted(p.name for p in folder.iterdir() if p.name.endswith(".csv")):
        with (folder / name).open(encoding="utf-8", newline="") as f:
            texts += [row["text"] for row in csv.DictReader(f)]
    joined = [" ".join(texts[i:i + JOIN]) for i in range(0, len(texts), JOIN)]
    return texts + joined


def calibration_batches(model_folder: Path, batch: int = 32, max_length: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, attention_mask)`` int64 batches of :func:`calibration_texts`, padded with [PAD]."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_folder) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    ids = [e.ids for e in tok.encode_batch(calibration_texts(), add_special_tokens=True)]
    pad = tok.token_to_id("[PAD]") or 0
    out = []
    for i in range(0, len(ids), batch):
        rows = ids[i:i + batch]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for j, r in enumerate(rows):
            input_ids[j, :len(r)] = r
            mask[j, :len(r)] = 1
        out.append((input_ids, mask))
    return out


def channel_max(fp32: Path, batches) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(max|X_k|, max|W_k|)`` per weight-MatMul input tensor, by name: the activations' over the
    unpadded tokens of ``batches``, the weights' over every MatMul that reads X (Q, K and V share
    one input)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    inputs = sorted({n.input[0] for n in matmuls})
    for name in inputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    x_max = {name: 0.0 for name in inputs}
    for ids, mask in batches:
        for name, x in zip(inputs, session.run(inputs, {"input_ids": ids, "attention_mask": mask})):
            real = x.reshape(-1, x.shape[-1])[mask.reshape(-1) > 0]
            x_max[name] = np.maximum(x_max[name], np.abs(real).max(0))
    w_max: dict[str, np.ndarray] = {}
    for n in matmuls:
        w_max[n.input[0]] = np.maximum(w_max.get(n.input[0], 0.0), np.abs(weights[n.input[1]]).max(1))
    # 4 significant digits: another CPU's fp32 kernels, which differ in the last bits, then give the
    # same maxima, so the same factors and the same file, but where a maximum sits at a rounding edge
    return {n: _significant(m) for n, m in x_max.items()}, w_max


def _significant(a: np.ndarray, digits: int = 4) -> np.ndarray:
    a = np.asarray(a, np.float64)
    exp = np.floor(np.log10(np.maximum(np.abs(a), 1e-30)))
    return (np.round(a / 10 ** (exp - digits + 1)) * 10 ** (exp - digits + 1)).astype(np.float32)


def smoothing(maxima, alpha: float) -> dict[str, np.ndarray]:
    """SmoothQuant's per-input-channel factor ``s`` (shape [K]) by input name, from
    :func:`channel_max`'s result; clipped to [1e-3, 1e3] so a dead channel cannot blow up a weight row.
    (Factors rounded to powers of two, exact in floating point, cost accuracy when measured: mean
    cosine to fp32 0.99940 against 0.99960 on SMS.)"""
    x_max, w_max = maxima
    return {name: np.clip(x_max[name] ** alpha / np.maximum(w_max[name], 1e-5) ** (1 - alpha), 1e-3, 1e3)
            for name in x_max}


def widest(x_max: dict[str, np.ndarray], smooth: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The ``k`` input channels of each MatMul input (at most an eighth of them) whose smoothed
    calibration maximum ``max|X_c| / s_c`` is largest, sorted: the columns kept in fp32."""
    return {name: np.sort(np.argsort(-(m / smooth[name]))[:min(k, len(m) // 8)]) for name, m in x_max.items()}


def down_projections(graph) -> set[str]:
    """Inputs of the weight MatMuls of an ONNX ``graph`` that narrow (K > N): the feed-forward
    down-projections, whose inputs come out of GELU and get asymmetric scales."""
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    return {n.input[0] for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in shapes and len(shapes[n.input[1]]) == 2
            and shapes[n.input[1]][0] > shapes[n.input[1]][1]}


def calibrate(fp32: Path, model_folder: Path, batches=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(smoothing factors, outlier channels)`` by MatMul input name, from :func:`calibration_texts`
    (or ``batches``, :func:`calibration_batches` already made)."""
    maxima = channel_max(fp32, batches or calibration_batches(model_folder))
    smooth = smoothing(maxima, ALPHA)
    return smooth, widest(maxima[0], smooth, OUTLIERS)


def shipped(source_fingerprint: str):
    """The shipped calibration result for this source fingerprint, or None (another backbone)."""
    from importlib import resources

    ref = resources.files("headfleet.embedder") / SHIPPED
    if not ref.is_file():
        return None
    with ref.open("rb") as f:
        data = np.load(f)
        if str(data["source_fingerprint"]) != source_fingerprint:
            return None
        names = [str(n) for n in data["names"]]
        return ({n: data[f"s{i}"] for i, n in enumerate(names)}, {n: data[f"o{i}"] for i, n in enumerate(names)})


def write_shipped(fp32: Path, model_folder: Path, source_fingerprint: str, out: Path) -> None:
    """Calibrate the shipped backbone and write its result to ``out`` (run once by a maintainer;
    ``tests/embedder/test_onnx_backend.py`` checks it against a fresh calibration)."""
    smooth, outliers = calibrate(fp32, model_folder)
    names = sorted(smooth)
    np.savez_compressed(out, source_fingerprint=np.array(source_fingerprint), names=np.array(names),
                        **{f"s{i}": smooth[n].astype(np.float32) for i, n in enumerate(names)},
                        **{f"o{i}": outliers[n].astype(np.int64) for i, n in enumerate(names)})


def quantize(fp32: Path, out: Path, model_folder: Path, form: str, source_fingerprint: str = "") -> None:
    """Write the ``w8a8`` file of the fp32 export ``fp32`` to ``out`` in ``form`` (``u8s8`` or ``u8u8``):
    from the shipped calibration when ``source_fingerprint`` is the shipped backbone's, else calibrated here."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    batches = calibration_batches(model_folder)
    smooth, outliers = shipped(source_fingerprint) or calibrate(fp32, model_folder, batches)
    build(fp32, out, smooth, kernel=form, asymmetric="down", w_bits=W_BITS, outliers=outliers)
    self_check(fp32, out, batches[:2])


SELF_CHECK_COSINE = 0.99


def self_check(fp32: Path, built: Path, batches) -> float:
    """The built file against the fp32 export on ``batches``: the lowest cosine of a text's vectors.

    Raises ValueError below ``SELF_CHECK_COSINE``: the graph leans on ONNX Runtime's
    ``MatMulIntegerToFloat`` taking a per-token A scale of shape [batch, seq, 1], which its contrib
    op schema does not promise, so a version that reads it otherwise is caught here, at build time,
    rather than as wrong vectors in the cache. (The shipped recipe measures >= 0.997 on real texts.)
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"]) for p in (fp32, built)]
    worst = 1.0
    for ids, mask in batches:
        ref, got = (s.run(None, {"input_ids": ids, "attention_mask": mask})[0] for s in sessions)
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
        worst = min(worst, float(cos.min()))
    if not worst >= SELF_CHECK_COSINE:
        raise ValueError(f"the w8a8 file fails its self-check against fp32 (lowest cosine {worst:.4f} < "
                         f"{SELF_CHECK_COSINE}) with onnxruntime {ort.__version__}; use precision fp32 or int8")
    return worst


def build(fp32: Path, out: Path, smooth: dict[str, np.ndarray], kernel: str = "u8s8",
          asymmetric: bool | str | set[str] = False, w_bits: int | None = None,
          keep: frozenset[str] | set[str] = frozenset(), outliers: dict[str, np.ndarray] | None = None) -> None:
    """Write the per-token int8 graph of ``fp32`` to ``out`` (ONNX opset 21, for blocked QuantizeLinear).

    ``smooth``: :func:`smoothing`'s factors. ``kernel``: ``u8s8`` or ``u8u8`` (module docstring).
    ``asymmetric``: True, False, ``"down"`` (the FFN down-projections' inputs, :func:`down_projections`),
    or the input names that get a zero point per token. ``w_bits``: 7
    (``u8s8``'s default, safe from AVX2's saturation) or 8 (``u8u8``'s default; with ``u8s8`` exact
    only where the CPU adds in int32). ``keep``: MatMul node names left in fp32. ``outliers``: input
    channels per input name kept in fp32 (:func:`widest`).

    Attention-score MatMuls (no weight) stay fp32, as do bias Adds: ONNX Runtime 1.32's
    ``MatMulIntegerToFloat`` adds its bias wrongly when the A scale is per token (checked: neither
    before nor after scaling), so the bias stays a separate Add.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    if kernel not in FORMS:
        raise ValueError(f"kernel must be u8s8 or u8u8, not {kernel!r}")
    w_bits = w_bits or (7 if kernel == "u8s8" else 8)
    if w_bits not in (7, 8):
        raise ValueError(f"w_bits must be 7 or 8, not {w_bits!r}")
    model = version_converter.convert_version(onnx.load(str(fp32)), 21)
    graph = model.graph
    if asymmetric == "down":
        asymmetric = down_projections(graph)
    weights = {i.name: i for i in graph.initializer}
    added: list = []

    def const(name: str, value) -> str:
        added.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    const("tq_axes", np.array([-1], np.int64))
    const("tq_eps", np.float32(1e-12))
    const("tq_zero", np.float32(0))
    const("tq_one", np.float32(1))
    const("tq_u8_0", np.uint8(0))
    const("tq_u8_128", np.uint8(128))
    const("tq_zp128", np.full((1, 1, 1), 128, np.uint8))
    const("tq_inv127", np.float32(1 / 127))
    const("tq_inv255", np.float32(1 / 255))
    quantised: dict[str, tuple[str, str, str | None]] = {}  # input -> (q, scale_t, zero_t * scale_t)
    flat: set[str] = set()
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.name in keep:
            nodes.append(node)
            continue
        x = node.input[0]
        w_raw = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        w = w_raw * smooth[x][:, None]
        k = w.shape[0]
        cols = outliers.get(x) if outliers else None
        if cols is not None and len(cols):
            w[cols] = 0  # their share is the fp32 MatMul below
        q_max = 2 ** (w_bits - 1) - 1
        w_scale = (np.maximum(np.abs(w).max(0), 1e-12) / q_max).astype(np.float32)
        wq = np.clip(np.round(w / w_scale), -q_max, q_max).astype(np.int8)
        p = "tq_" + node.name.strip("/").replace("/", "_")
        const(p + "_w", wq if kernel == "u8s8" else (wq.astype(np.int16) + 128).astype(np.uint8))
        const(p + "_ws", w_scale)
        a = "tq_" + x.strip("/").replace("/", "_")
        if x not in quantised:
            inv_s = (1 / smooth[x]).astype(np.float32)
            if cols is not None and len(cols):  # one Mul smooths the int8 part and zeroes the fp32 columns in it
                inv_s[cols] = 0
                # the fp32 columns picked by a GEMM with a one-hot [K, 16] matrix: exact (every other
                # product is a zero), and ~6 % of the whole forward faster than a Gather on the last
                # axis, which ONNX Runtime runs element by element (two quiet in-process runs, 32 SMS:
                # 156.4 -> 144.4 ms, 141.2 -> 133.1 ms; vectors equal to the bit on 2,000 SMS)
                sel = np.zeros((k, len(cols)), np.float32)
                sel[cols, np.arange(len(cols))] = 1
                nodes.append(helper.make_node("MatMul", [x, const(a + "_osel", sel)], [a + "_xo"]))
            nodes.append(helper.make_node("Mul", [x, const(a + "_inv_s", inv_s)], [a + "_x"]))
            nodes += [helper.make_node("ReduceMax", [a + "_x", "tq_axes"], [a + "_max"], keepdims=1),
                      helper.make_node("ReduceMin", [a + "_x", "tq_axes"], [a + "_min"], keepdims=1)]
            if asymmetric is True or (asymmetric and x in asymmetric):  # [min(min, 0), max(max, 0)], zero 0..255
                nodes += [helper.make_node("Min", [a + "_min", "tq_zero"], [a + "_lo"]),
                          helper.make_node("Max", [a + "_max", "tq_zero"], [a + "_hi"]),
                          helper.make_node("Sub", [a + "_hi", a + "_lo"], [a + "_range"]),
                          helper.make_node("Max", [a + "_range", "tq_eps"], [a + "_range1"]),
                          helper.make_node("Mul", [a + "_range1", "tq_inv255"], [a + "_scale"]),
                          helper.make_node("Div", [a + "_lo", a + "_scale"], [a + "_lo_q"]),
                          helper.make_node("Neg", [a + "_lo_q"], [a + "_zero_f"]),
                          helper.make_node("QuantizeLinear", [a + "_zero_f", "tq_one", "tq_u8_0"], [a + "_zero"]),
                          helper.make_node("Cast", [a + "_zero"], [a + "_zero_back"], to=TensorProto.FLOAT),
                          helper.make_node("Mul", [a + "_zero_back", a + "_scale"], [a + "_zero_scaled"])]
                shifted = a + "_zero_scaled"
            else:  # symmetric: |x| <= 127 steps around 128
                nodes += [helper.make_node("Neg", [a + "_min"], [a + "_neg_min"]),
                          helper.make_node("Max", [a + "_max", a + "_neg_min", "tq_eps"], [a + "_absmax"]),
                          helper.make_node("Mul", [a + "_absmax", "tq_inv127"], [a + "_scale"]),
                          helper.make_node("Shape", [a + "_scale"], [a + "_shape"]),
                          helper.make_node("Expand", ["tq_zp128", a + "_shape"], [a + "_zero"])]
                shifted = None
            nodes.append(helper.make_node("QuantizeLinear", [a + "_x", a + "_scale", a + "_zero"], [a + "_q"],
                                          axis=2, block_size=k))
            quantised[x] = (a + "_q", a + "_scale", shifted)
        q, scale, shifted = quantised[x]
        inputs = [q, p + "_w", scale, p + "_ws", "tq_u8_0" if shifted else "tq_u8_128",
                  "tq_u8_128" if kernel == "u8u8" else ""]
        y = node.output[0] if cols is None or not len(cols) else p + "_int"
        if shifted is None:
            nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [y], domain="com.microsoft"))
        else:  # the zero point's share, zero_t * scale_t * sum_k Wq[k, n] * scale_w[n], comes off after
            col = ((wq.astype(np.int32)).sum(0) * w_scale).astype(np.float32)
            nodes += [helper.make_node("MatMulIntegerToFloat", inputs, [p + "_raw"], domain="com.microsoft"),
                      helper.make_node("Mul", [shifted, const(p + "_col", col)], [p + "_zero_share"]),
                      helper.make_node("Sub", [p + "_raw", p + "_zero_share"], [y])]
        if y != node.output[0]:
            # one Gemm adds the fp32 columns' share into the integer output (C with beta = 1): against
            # a MatMul then an Add, one pass less over [tokens, N] (11 % faster on SMS in one
            # interleaved in-process run, the same vectors to the bit)
            if a + "_xo2" not in flat:
                flat.add(a + "_xo2")
                nodes.append(helper.make_node("Reshape", [a + "_xo", const(a + "_o2", np.array([-1, len(cols)], np.int64))],
                                              [a + "_xo2"]))
            n_out = w_raw.shape[1]
            nodes += [helper.make_node("Shape", [y], [p + "_shape"]),
                      helper.make_node("Reshape", [y, const(p + "_y2", np.array([-1, n_out], np.int64))], [p + "_int2"]),
                      helper.make_node("Gemm", [a + "_xo2", const(p + "_wo", w_raw[cols]), p + "_int2"], [p + "_sum2"],
                                       alpha=1.0, beta=1.0),
                      helper.make_node("Reshape", [p + "_sum2", p + "_shape"], [node.output[0]])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used] + [i for i in added if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out))
