"""int8 recipes for the backbone on this CPU, beside ONNX fp32 and sentence-transformers.

Every recipe starts from the same fp32 ONNX export of the shipped weights (headfleet's own):

- ``w8a8``: headfleet's shipped ``w8a8`` precision (``headfleet.embedder.w8a8``): the per-token
  recipe below with 8-bit weights, asymmetric scales on the FFN down-projection only, SmoothQuant
  alpha 0.5, each MatMul input's 16 widest channels kept in fp32 (LLM.int8()), calibrated on
  headfleet's own example texts, in the form this CPU runs exactly (``u8s8`` with VNNI).
- ``nbits``: headfleet's shipped int8. MatMulNBits, 8-bit weights in blocks of 32 along K, and
  activations quantised per row and block at run time (accuracy_level 4), so a text's vector
  never depends on the other texts of its batch.
- ``dynamic``: ``quantize_dynamic``, with per-channel int8 weights. Activations get one scale per
  tensor at run time (DynamicQuantizeMatMul, the MatMulInteger path), so the scale depends on the
  whole batch.
- ``static``: ``quantize_static`` QDQ on the weight MatMuls, with per-channel int8 weights and
  uint8 activations whose scales are calibrated once (MinMax) on 192 SMS and 64 news texts that
  are not timed. Fixed scales make it batch-independent. The attention-score MatMuls stay fp32.
- ``static-no-ffn-down``: the same, leaving the feed-forward down-projection in fp32. Its inputs
  (after GELU) have the widest range.
- ``token-u8s8`` and ``token-u8u8``: per-token int8 activations with SmoothQuant smoothing
  (``bench/_token_int8.py``), calibrated on the same untimed texts. One scale per token keeps them
  batch-independent; ``MatMulIntegerToFloat`` runs the GEMM. ``token-u8s8`` (symmetric, alpha 0.5)
  takes the fast uint8 x int8 kernel, whose AVX2 form saturates at 8-bit weights, so its weights keep
  7 bits. ``token-u8u8`` (asymmetric per token, alpha 0.6) keeps 8 bits on both sides, on the
  slower uint8 x uint8 kernel. ``token-u8s8-w8`` and ``token-u8s8-asym-w8`` are the VNNI forms:
  the fast uint8 x int8 kernel with 8-bit weights, symmetric (alpha 0.5) or asymmetric per token
  (alpha 0.6). They are exact only on a CPU whose int8 dot product adds in int32 (VNNI); on AVX2
  alone their sums saturate and the cosine column shows it. ``token-outlier8`` adds LLM.int8()'s
  decomposition to ``token-u8s8-asym-w8``: each input's 8 widest calibrated channels stay fp32.
- ``openvino-fp32`` and ``openvino-nbits``: OpenVINO's CPU plugin on the fp32 export and on the
  MatMulNBits file, only when ``openvino`` is installed.

Each contender runs in a process of its own (this script with ``--only NAME``), a new one per round,
interleaved with the others, and keeps its best of ``--rounds`` rounds: texts/s at batch 64 on SMS (about 25 tokens)
and on news-length texts (about 54 tokens), with the same length-sorted batching for all. The ratio
is to sentence-transformers ``encode`` measured in the same run.

Then two checks on every recipe, both against ONNX fp32:

- quality: cosine over every timed text, min and mean;
- batch independence: the largest difference of any component between a text embedded alone and
  the same text inside a batch of 64. A recipe that moves it by more than 1e-4 cannot serve a
  content-addressed cache: a cached vector would depend on which texts shared its batch.

Which CPU this runs on matters more than anything else here. The header says whether it has an int8
dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX). Without one, int8 GEMMs go through
AVX2's 16-bit multiply-add, and the per-row recipe's extra quantise steps are not paid back.

    .venv/bin/python bench/int8_recipes.py [--n-short 512] [--n-long 256] [--rounds 3]
    .venv/bin/python bench/int8_recipes.py --sensitivity   # where static int8 loses its accuracy
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import _token_int8
from _common import begin, interleaved_processes, long_texts, report, sms_texts

RECIPES = ("w8a8", "nbits", "dynamic", "static", "static-no-ffn-down", "token-u8s8", "token-u8u8", "token-u8s8-w8",
           "token-u8s8-asym-w8", "token-outlier8", "openvino-fp32", "openvino-nbits")
TOKEN_RECIPES = {"token-u8s8": dict(alpha=0.5, kernel="u8s8", asymmetric=False),
                 "token-u8u8": dict(alpha=0.6, kernel="u8u8", asymmetric=True),
                 # the VNNI forms: u8 x s8 with 8-bit weights (exact only where VPDPBUSD adds in int32)
                 "token-u8s8-w8": dict(alpha=0.5, kernel="u8s8", asymmetric=False, w_bits=8),
                 "token-u8s8-asym-w8": dict(alpha=0.6, kernel="u8s8", asymmetric=True, w_bits=8),
                 # and LLM.int8()'s decomposition: each input's 8 widest channels stay fp32
                 "token-outlier8": dict(alpha=0.6, kernel="u8s8", asymmetric=True, w_bits=8, outliers=8)}
CONTENDERS = ("sentence-transformers", "onnx-fp32") + RECIPES
BATCH_BOUND = 1e-4


def _embedder(folder: Path):
    from headfleet.embedder import Embedder

    return Embedder.load(device="cpu", backend="onnx", precision="fp32", cache_dir=folder)


def build(folder: Path, sensitivity: bool = False) -> None:
    """Every recipe's ONNX file in ``folder``; the fp32 export and MatMulNBits file through headfleet."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from headfleet.embedder import Embedder
    from headfleet.embedder.onnx_backend import quantize_int8_dynamic

    emb = _embedder(folder)
    Embedder.load(device="cpu", backend="onnx", precision="int8", cache_dir=folder)
    Embedder.load(device="cpu", backend="onnx", precision="w8a8", cache_dir=folder)
    fp32 = next(folder.glob("*-fp32-r*.onnx"))
    quantize_int8_dynamic(fp32, folder / "dynamic.onnx")
    graph = onnx.load(str(fp32)).graph
    weights = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    scores = [n.name for n in matmuls if n.input[1] not in weights]  # QK^T and attention x V
    ffn_down = [n.name for n in matmuls if "/output/dense/" in n.name and "attention" not in n.name]
    calibration = _token_int8.calibration_batches(emb, sms_texts(2000), long_texts(700))  # none of them is timed

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = list(calibration)

        def get_next(self):
            if not self.batches:
                return None
            ids, mask = self.batches.pop(0)
            return {"input_ids": ids, "attention_mask": mask}

    def static(name: str, keep_fp32: list[str]) -> Path:
        out = folder / f"{name}.onnx"
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32,
                        calibrate_method=CalibrationMethod.MinMax)
        return out

    static("static", scores)
    static("static-no-ffn-down", scores + ffn_down)
    build_token_recipes(fp32, folder, calibration)
    if sensitivity:  # one group of weight MatMuls quantised at a time, the rest fp32
        from headfleet.embedder.onnx_backend import OrtRunner

        texts = sms_texts(256) + long_texts(64)
        ref = emb.embed(texts).vectors
        mine = [n.name for n in matmuls if n.input[1] in weights]
        groups = {"query/key/value": [n for n in mine if "/self/" in n],
                  "attention output": [n for n in mine if "/attention/output/" in n],
                  "FFN up": [n for n in mine if "/intermediate/" in n], "FFN down": ffn_down}
        for group, names in groups.items():
            emb.runner = OrtRunner(static("group", [n for n in mine if n not in names] + scores))
            cos = (emb.embed(texts).vectors * ref).sum(1)
            print(f"  only {group} ({len(names)} MatMuls) in int8: cosine to fp32 min {cos.min():.4f} "
                  f"mean {cos.mean():.5f}", flush=True)


def build_token_recipes(fp32: Path, folder: Path, batches, names=None) -> dict[str, Path]:
    """``TOKEN_RECIPES`` (or those of ``names``) as ``<folder>/<name>.onnx``, smoothing calibrated on ``batches``."""
    files = {}
    maxima = _token_int8.channel_max(fp32, batches)
    for name, recipe in TOKEN_RECIPES.items():
        if names is not None and name not in names:
            continue
        smooth = _token_int8.smoothing(maxima, recipe["alpha"])
        files[name] = folder / f"{name}.onnx"
        outliers = _token_int8.widest(maxima[0], smooth, recipe["outliers"]) if recipe.get("outliers") else None
        _token_int8.build(fp32, files[name], smooth, kernel=recipe["kernel"], asymmetric=recipe["asymmetric"],
                          w_bits=recipe.get("w_bits"), outliers=outliers)
    return files


def _runner(name: str, folder: Path):
    """``(input_ids, mask) -> [batch, dim]`` for one recipe."""
    from headfleet.embedder.onnx_backend import OrtRunner

    files = {"onnx-fp32": next(folder.glob("*-fp32-r*.onnx")), "nbits": next(folder.glob("*-int8-r*.onnx")),
             "w8a8": next(folder.glob("*-w8a8-*-r*.onnx")),
             "dynamic": folder / "dynamic.onnx", "static": folder / "static.onnx",
             "static-no-ffn-down": folder / "static-no-ffn-down.onnx",
             **{n: folder / f"{n}.onnx" for n in TOKEN_RECIPES}}
    if not name.startswith("openvino"):
        return OrtRunner(files[name])
    import openvino

    compiled = openvino.Core().compile_model(str(files["onnx-fp32" if name == "openvino-fp32" else "nbits"]), "CPU",
                                             {"PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda ids, mask: request.infer({"input_ids": ids, "attention_mask": mask})[0].copy()


def measure_one(name: str, args) -> dict:
    """One contender in this process: best texts/s per workload; vectors saved for the checks."""
    folder = Path(args.folder)
    work = {"short": sms_texts(args.n_short), "long": long_texts(args.n_long)}
    if name == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        from headfleet.embedder import default_model_path

        model = SentenceTransformer(str(default_model_path()), device="cpu")
        embed = lambda texts: model.encode(texts, batch_size=64, convert_to_numpy=True)  # noqa: E731
    else:
        emb = _embedder(folder)
        emb.runner = _runner(name, folder)
        embed = lambda texts: emb.embed(texts).vectors  # noqa: E731
    for texts in work.values():  # warm-up on the timed shapes: first calls plan memory and kernels
        embed(texts)
    best = {}
    for _ in range(args.rounds):
        for w, texts in work.items():
            t0 = time.perf_counter()
            embed(texts)
            best[w] = max(best.get(w, 0.0), len(texts) / (time.perf_counter() - t0))
    np.save(folder / f"vectors-{name}.npy", np.concatenate([embed(work["short"]), embed(work["long"])]))
    if name != "sentence-transformers":
        some = work["short"][:64]
        together = embed(some)
        alone = np.stack([embed([t])[0] for t in some])
        best["batch_dependence"] = float(np.abs(together - alone).max())
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-short", type=int, default=512)
    ap.add_argument("--n-long", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sensitivity", action="store_true",
                    help="only print each MatMul group's cosine when it alone is statically quantised (no timing)")
    ap.add_argument("--contenders", help="comma-separated subset of: " + ", ".join(CONTENDERS)
                    + " (sentence-transformers and onnx-fp32 are always measured)")
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure_one(args.only, args)), flush=True)
        return
    if args.sensitivity:
        begin("static int8, one group of MatMuls at a time: cosine to ONNX fp32 on 256 SMS + 64 news texts")
        with tempfile.TemporaryDirectory(prefix="headfleet-int8-") as tmp:
            build(Path(tmp), sensitivity=True)
        return
    title = "int8 recipes: texts/s at batch 64, each contender in its own process"
    begin(title)
    with tempfile.TemporaryDirectory(prefix="headfleet-int8-") as tmp:
        folder = Path(tmp)
        build(folder)  # before any timing, so no contender pays for an export
        wanted = [n for n in CONTENDERS if not n.startswith("openvino") or importlib.util.find_spec("openvino")]
        if args.contenders:
            chosen = set(args.contenders.split(",")) | {"sentence-transformers", "onnx-fp32"}
            unknown = chosen - set(CONTENDERS)
            if unknown:
                raise SystemExit(f"unknown contender(s) {sorted(unknown)}; expected some of {', '.join(CONTENDERS)}")
            wanted = [n for n in wanted if n in chosen]
        results, skipped = interleaved_processes(__file__, wanted, args.rounds,
                                                 ["--folder", tmp, "--n-short", str(args.n_short),
                                                  "--n-long", str(args.n_long)])
        skipped.update({n: "openvino is not installed (pip install openvino)" if n.startswith("openvino")
                        and not importlib.util.find_spec("openvino") else "not asked for (--contenders)"
                        for n in CONTENDERS if n not in wanted})
        ref = np.load(folder / "vectors-onnx-fp32.npy")
        for name in results:
            v = np.load(folder / f"vectors-{name}.npy")
            cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
            results[name]["cos_min"], results[name]["cos_mean"] = float(cos.min()), float(cos.mean())
    st = results["sentence-transformers"]
    rows = [("contenders", f"a process each per round, interleaved, best of {args.rounds} rounds; {args.n_short} SMS, "
                           f"{args.n_long} news-length texts; cosine and batch checks against ONNX fp32")]
    for name in CONTENDERS:
        if name in skipped:
            rows.append((name, f"not measured: {skipped[name]}"))
            continue
        r = results[name]
        line = (f"SMS {r['short']:6.1f} texts/s ({r['short'] / st['short']:.2f}x ST) | news {r['long']:5.1f} "
                f"({r['long'] / st['long']:.2f}x ST) | cosine min {r['cos_min']:.4f} mean {r['cos_mean']:.5f}")
        if "batch_dependence" in r:
            dep = r["batch_dependence"]
            line += f" | batch 1 vs 64: {dep:.1e}" + (" (batch-DEPENDENT: cannot be cached)" if dep > BATCH_BOUND else "")
        rows.append((name, line))
    report(title, rows, {n: {k: round(v, 6) for k, v in r.items()} for n, r in results.items()})


if __name__ == "__main__":
    main()
