"""Per-token int8 with SmoothQuant: the int8 recipe that stays batch-independent and uses ONNX
Runtime's integer GEMM (``MatMulIntegerToFloat``) instead of MatMulNBits. Bench-only: it is not a
precision headfleet serves (see bench/int8_recipes.py and bench/parity.py for why).

Every weight MatMul ``Y = X W + b`` of the fp32 export (X: [batch, seq, K], W: [K, N]) becomes

    X' = X / s                      s: [K], SmoothQuant's per-channel smoothing, fixed at build time
    W' = s[:, None] * W             so X' W' = X W exactly before rounding
    scale_t = max|X'_t| / 127       one scale per token t (a row of X'), computed at run time
    q_t = round(X'_t / scale_t) + 128            uint8, blocked QuantizeLinear with block = K
    Y = (q - 128) Wq * scale_t * scale_w + b     Wq int8 per output column, scale_w: [N]

- **Batch independence:** every scale belongs to one token or one weight column, and the integer
  product is exact, so a text's vector does not depend on the texts that share its batch (unlike
  ``quantize_dynamic``, whose one activation scale covers the whole batch).
- **Smoothing:** ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)`` over calibration texts (Xiao et al.,
  "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models", ICML
  2023, eq. 4). It moves the outlier channels of the activations into the weights, where per-column
  scales absorb them. Per-token activation scales follow ZeroQuant (Yao et al., NeurIPS 2022).
- **Q, K and V** share their input, so it is quantised once for the three.
- **Two variants, because of this CPU's instruction set:**
  - ``kernel="u8s8"``: uint8 activations x int8 weights, ONNX Runtime's fast x86 path. Without an
    int8 dot product (VNNI), that path multiplies with AVX2's ``VPMADDUBSW``, which adds two
    u8 x s8 products in a saturating int16. 255 x 127 x 2 overflows it, so the weights keep 7 bits
    (|w| <= 63), the ``reduce_range`` of ONNX Runtime's quantisation tools.
  - ``kernel="u8u8"``: both uint8 (weights offset by 128), full 8 bits each. ONNX Runtime widens to
    16 bits before multiplying: no saturation, more accurate, slower.
  - ``asymmetric=True`` gives each token its own zero point, from its min and max. The inputs of the
    feed-forward down-projection come out of GELU (>= -0.17), so symmetric scales waste half of
    the range there. The zero point's share, ``zero_t * scale_t * sum_k Wq[k, n] * scale_w[n]``, is
    subtracted after the GEMM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CALIBRATION = (slice(1500, 1692), slice(600, 664))  # SMS and news rows no bench times


def calibration_batches(emb, sms: list[str], news: list[str], batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, attention_mask)`` batches of the calibration texts, padded as ``emb`` pads."""
    texts = sms[CALIBRATION[0]] + news[CALIBRATION[1]]
    ids = emb.tokenize(texts).ids
    return [emb.pad(ids[i:i + batch]) for i in range(0, len(ids), batch)]


def smoothing(fp32: Path, batches, alpha: float) -> dict[str, np.ndarray]:
    """SmoothQuant's per-input-channel factor ``s`` for every weight MatMul input, by tensor name.

    ``max|X_k|`` is over the unpadded tokens of ``batches``; ``max|W_k|`` over every MatMul that reads
    X (Q, K and V share one). Clipped to [1e-3, 1e3] so a dead channel cannot blow up a weight row.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    inputs = sorted({n.input[0] for n in matmuls})
    for name in inputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x_max = {name: 0.0 for name in inputs}
    for ids, mask in batches:
        for name, x in zip(inputs, session.run(inputs, {"input_ids": ids, "attention_mask": mask})):
            real = x.reshape(-1, x.shape[-1])[mask.reshape(-1) > 0]
            x_max[name] = np.maximum(x_max[name], np.abs(real).max(0))
    w_max: dict[str, np.ndarray] = {}
    for n in matmuls:
        w_max[n.input[0]] = np.maximum(w_max.get(n.input[0], 0.0), np.abs(weights[n.input[1]]).max(1))
    return {name: np.clip(x_max[name] ** alpha / np.maximum(w_max[name], 1e-5) ** (1 - alpha), 1e-3, 1e3)
            for name in inputs}


def build(fp32: Path, out: Path, smooth: dict[str, np.ndarray], kernel: str = "u8s8",
          asymmetric: bool = False) -> None:
    """Write the per-token int8 graph of ``fp32`` to ``out`` (ONNX opset 21, for blocked QuantizeLinear).

    ``smooth``: from :func:`smoothing`. Attention-score MatMuls (no weight) stay fp32, as do bias
    Adds: ONNX Runtime 1.32's ``MatMulIntegerToFloat`` adds its bias wrongly when the A scale is per
    token (checked: neither before nor after scaling), so the bias stays a separate Add.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    if kernel not in ("u8s8", "u8u8"):
        raise ValueError(f"kernel must be u8s8 or u8u8, not {kernel!r}")
    model = version_converter.convert_version(onnx.load(str(fp32)), 21)
    graph = model.graph
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
    w_bits = 7 if kernel == "u8s8" else 8
    quantised: dict[str, tuple[str, str, str | None]] = {}  # input -> (q, scale_t, zero_t * scale_t)
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        x = node.input[0]
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32) * smooth[x][:, None]
        k = w.shape[0]
        q_max = 2 ** (w_bits - 1) - 1
        w_scale = (np.maximum(np.abs(w).max(0), 1e-12) / q_max).astype(np.float32)
        wq = np.clip(np.round(w / w_scale), -q_max, q_max).astype(np.int8)
        p = "tq_" + node.name.strip("/").replace("/", "_")
        const(p + "_w", wq if kernel == "u8s8" else (wq.astype(np.int16) + 128).astype(np.uint8))
        const(p + "_ws", w_scale)
        if x not in quantised:
            a = "tq_" + x.strip("/").replace("/", "_")
            nodes.append(helper.make_node("Mul", [x, const(a + "_inv_s", (1 / smooth[x]).astype(np.float32))], [a + "_x"]))
            nodes += [helper.make_node("ReduceMax", [a + "_x", "tq_axes"], [a + "_max"], keepdims=1),
                      helper.make_node("ReduceMin", [a + "_x", "tq_axes"], [a + "_min"], keepdims=1)]
            if asymmetric:  # range [min(min, 0), max], zero point in 0..255 per token
                nodes += [helper.make_node("Min", [a + "_min", "tq_zero"], [a + "_lo"]),
                          helper.make_node("Sub", [a + "_max", a + "_lo"], [a + "_range"]),
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
        if shifted is None:
            nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [node.output[0]], domain="com.microsoft"))
        else:
            col = ((wq.astype(np.int32)).sum(0) * w_scale).astype(np.float32)
            nodes += [helper.make_node("MatMulIntegerToFloat", inputs, [p + "_raw"], domain="com.microsoft"),
                      helper.make_node("Mul", [shifted, const(p + "_col", col)], [p + "_zero_share"]),
                      helper.make_node("Sub", [p + "_raw", p + "_zero_share"], [node.output[0]])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used] + [i for i in added if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out))
