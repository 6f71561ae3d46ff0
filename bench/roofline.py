"""How close each backbone backend runs to this machine's measured peak.

Measures the peak first — fp32 GEMM (the best of torch ``matmul`` and ONNX Runtime ``MatMul``) and
int8 GEMM (ONNX Runtime ``MatMulInteger``, uint8 x int8 -> int32, the VNNI path) on 1024^3 — then
each contender's texts/s at batch 64 on short (SMS) and long (~250-character) texts, and turns
texts/s into useful GFLOP/s: the FLOPs of the *real* tokens only (no padding), per layer and token
``2 * (4 d^2 + 2 d f) + 4 L d`` (the four attention projections, the two feed-forward matrices, and
QK^T plus AV over the text's own length L; Vaswani et al. 2017, Kaplan et al. 2020 eq. 2.1 for the
counting convention). all-MiniLM-L6-v2: d = 384, f = 1536, 6 layers -> 21.2 MFLOP per token before
attention. The fraction of peak says how much is left to win on this CPU: a backend near its
precision's peak can only go faster by computing less (padding, shorter inputs).

Each contender runs in a process of its own (this script with ``--only NAME``): in a shared
process torch's idle intra-op threads spin while ONNX Runtime's run, which halved the ONNX figures
in an earlier version of this bench. Every round starts a new process per contender, interleaved
(``_common.interleaved_processes``), because this machine's speed drifts by 10-20 % over minutes:
contenders measured one after the other swapped places between two runs.

    .venv/bin/python bench/roofline.py [--n-short 1000] [--n-long 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import begin, interleaved_processes, long_texts, report, sms_texts
from backends import best_of, fastembed_contender, ours, peer
from headfleet.embedder import Embedder, default_model_path


def _best_s(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ort_matmul(dtype: str, n: int, threads: int):
    """An ONNX Runtime session computing one n x n x n GEMM: ``fp32`` MatMul or ``int8`` MatMulInteger."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    if dtype == "fp32":
        b = rng.standard_normal((n, n)).astype(np.float32)
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type, y_type, feed = TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((n, n)).astype(np.float32)
    else:
        b = rng.integers(-127, 127, (n, n), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type, feed = TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 255, (n, n), dtype=np.uint8)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])],
                              [onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"a": feed})


def peaks(threads: int, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of one n^3 GEMM, best of ``repeats``."""
    flops = 2.0 * n ** 3
    x, y = torch.randn(n, n), torch.randn(n, n)
    fp32 = max(flops / _best_s(lambda: x @ y, repeats), flops / _best_s(_ort_matmul("fp32", n, threads), repeats))
    int8 = flops / _best_s(_ort_matmul("int8", n, threads), repeats)
    return {"fp32": fp32 / 1e9, "int8": int8 / 1e9}


def useful_flops(embedder: Embedder, texts: list[str]) -> float:
    """FLOPs of the real tokens of ``texts`` through the encoder (see the module docstring)."""
    cfg = embedder.model.config if hasattr(embedder, "model") and embedder.model is not None else None
    d, f, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) if cfg else (384, 1536, 6)
    lengths = np.array([min(len(e.ids), embedder.max_length) for e in embedder.tokenizer.encode_batch(list(texts))],
                       dtype=np.float64)
    per_token = 2.0 * (4 * d * d + 2 * d * f)
    return float(layers * (lengths.sum() * per_token + (4.0 * d * lengths ** 2).sum()))


CONTENDERS = ("sentence-transformers", "fastembed", "torch fp32", "onnx fp32", "onnx int8", "onnx w8a8")
INTEGER = ("int8", "w8a8")  # measured against the int8 GEMM peak


def measure_one(name: str, args) -> dict:
    """Best-of-rounds texts/s of one contender on both workloads, in this process (``--only``)."""
    threads = torch.get_num_threads()
    cache_dir = Path(args.cache_dir)
    folder = default_model_path()  # the shipped model; no torch forward runs in an ONNX contender's process
    if name == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        c = peer(name, SentenceTransformer(str(folder), device="cpu"))
    elif name == "fastembed":
        c, skip = fastembed_contender(folder, cache_dir, threads)
        if c is None:
            return {"skip": skip}
    else:
        backend, precision = name.split()
        backend = {"torch": "torch", "onnx": "onnx"}[backend]
        c = ours(name, Embedder.load(device="cpu", threads=threads, backend=backend, precision=precision,
                                     cache_dir=cache_dir))
    work = {"short": (sms_texts(args.n_short), 64), "long": (long_texts(args.n_long), 64)}
    for texts, batch in work.values():  # warm-up on the timed shapes: first calls plan memory and kernels
        c.embed(texts, batch)
    best = best_of(args.rounds, [c], work)
    return {w: best[c.name, w] for w in work}


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-short", type=int, default=1000)
    ap.add_argument("--n-long", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", default=None, help="where ONNX exports are kept (default: a temp dir)")
    ap.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)  # one contender, JSON out
    args = ap.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure_one(args.only, args)), flush=True)
        return
    title = "roofline: each backend's useful GFLOP/s against this machine's GEMM peak, batch 64"
    begin(title)
    threads = torch.get_num_threads()
    peak = peaks(threads)
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="headfleet-onnx-")
    torch_fp32 = Embedder.load(device="cpu", threads=threads)
    # exports made once here, so no contender's process pays for them
    for precision in INTEGER:
        Embedder.load(device="cpu", threads=threads, backend="onnx", precision=precision, cache_dir=Path(args.cache_dir))
    Embedder.load(device="cpu", threads=threads, backend="onnx", cache_dir=Path(args.cache_dir))
    got, skipped = interleaved_processes(__file__, CONTENDERS, args.rounds,
                                         ["--n-short", str(args.n_short), "--n-long", str(args.n_long),
                                          "--cache-dir", args.cache_dir])
    best = {(name, w): v for name, figures in got.items() for w, v in figures.items()}
    work = {"short": sms_texts(args.n_short), "long": long_texts(args.n_long)}
    flops = {w: useful_flops(torch_fp32, texts) / len(texts) for w, texts in work.items()}
    rows = [("peak, measured", f"fp32 GEMM {peak['fp32']:.1f} GFLOP/s; int8 GEMM (MatMulInteger) {peak['int8']:.1f} "
                               f"GOP/s ({peak['int8'] / peak['fp32']:.2f}x fp32); {threads} thread(s)"),
            ("useful work per text", " | ".join(f"{w}: {flops[w] / 1e6:.0f} MFLOP" for w in work)
             + "  (real tokens only)"),
            ("roofline, texts/s", " | ".join(f"{w}: fp32 {peak['fp32'] * 1e9 / flops[w]:,.0f}, int8 "
                                             f"{peak['int8'] * 1e9 / flops[w]:,.0f}" for w in work)),
            ("contenders", "each in a process of its own per round, interleaved, best of "
                           f"{args.rounds} rounds, batch 64")]
    st = "sentence-transformers"
    for name in CONTENDERS:
        if name in skipped:
            rows.append((name, f"not measured: {skipped[name]}"))
            continue
        integer = name.split()[-1] in INTEGER
        ceiling = peak["int8"] if integer else peak["fp32"]
        parts = []
        for w in work:
            gflops = best[name, w] * flops[w] / 1e9
            parts.append(f"{w}: {best[name, w]:6,.0f} texts/s = {gflops:5.1f} GFLOP/s, {gflops / ceiling:4.0%} of "
                         f"{'int8' if integer else 'fp32'} peak, {best[name, w] / best[st, w]:.2f}x ST")
        rows.append((name, " | ".join(parts)))
    report(title, rows, {"peak_gflops": peak, **{f"{c} / {w}": round(v, 1) for (c, w), v in best.items()}})


if __name__ == "__main__":
    main()
