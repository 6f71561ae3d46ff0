"""Per-token int8 with SmoothQuant: the int8 recipes that stay batch-independent and use ONNX
Runtime's integer GEMM (``MatMulIntegerToFloat``) instead of MatMulNBits. The graph builder is
headfleet's own (``headfleet.embedder.w8a8``, whose shipped ``w8a8`` precision is one of these
recipes with fixed settings); this module adds the bench's calibration on SMS and news texts and
the variants that were measured and not shipped (bench/int8_recipes.py, bench/parity.py).

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

import numpy as np

from headfleet.embedder.w8a8 import build, channel_max, smoothing, widest

__all__ = ["CALIBRATION", "build", "calibration_batches", "channel_max", "smoothing", "widest"]

CALIBRATION = (slice(1500, 1692), slice(600, 664))  # SMS and news rows no bench times


def calibration_batches(emb, sms: list[str], news: list[str], batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, attention_mask)`` batches of the calibration texts, padded as ``emb`` pads."""
    texts = sms[CALIBRATION[0]] + news[CALIBRATION[1]]
    ids = emb.tokenize(texts).ids
    return [emb.pad(ids[i:i + batch]) for i in range(0, len(ids), batch)]
