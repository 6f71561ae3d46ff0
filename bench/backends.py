"""Backbone backends side by side: headfleet's torch fp32, ONNX fp32 and ONNX int8 against
sentence-transformers ``encode`` (and its own ONNX backend where it installs).

Same model folder, same texts, same thread count, same process. Throughput is texts/s on short
(SMS) and long (~250-character) texts, at batch 1 (one call per text, as a lone request) and at
batch 64; the contenders alternate over several rounds and the best round of each is kept. Then
p50/p99 latency of one short text at batch 1, parity with torch fp32 (cosine, and the labels of a
logistic-regression head trained on torch fp32 vectors, on a held-out part of sms_spam), and the
levers on the miss path: intra-op threads, ONNX Runtime graph optimisation, length bucketing, and
the int8 recipe we did not ship (``quantize_dynamic``).

    .venv/bin/python bench/backends.py [--n-short 512] [--n-long 256] [--n-single 64] \
        [--latency-n 200] [--rounds 3] [--threads N] [--agree-n 1500] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import long_texts, percentiles_ms, report, sms_labelled, sms_texts
from headfleet.embedder import Embedder, fingerprint
from headfleet.embedder.onnx_backend import OrtRunner, model_file, quantize_int8_dynamic


class Contender:
    def __init__(self, name: str, embed):
        self.name = name
        self.embed = embed  # (texts, batch_size) -> [n, dim] float32

    def throughput(self, texts: list[str], batch_size: int) -> float:
        t0 = time.perf_counter()
        if batch_size == 1:
            for t in texts:
                self.embed([t], 1)
        else:
            self.embed(texts, batch_size)
        return len(texts) / (time.perf_counter() - t0)

    def latency(self, texts: list[str]) -> dict[str, float]:
        samples = []
        for t in texts:
            t0 = time.perf_counter()
            self.embed([t], 1)
            samples.append(time.perf_counter() - t0)
        return percentiles_ms(samples)


def ours(name: str, e: Embedder) -> Contender:
    def embed(texts, batch_size):
        e.batch_size = batch_size
        return e.embed(texts).vectors

    return Contender(name, embed)


def peer(name: str, model) -> Contender:
    return Contender(name, lambda texts, bs: model.encode(texts, batch_size=bs, convert_to_numpy=True))


def sentence_transformers_onnx(folder: Path):
    """sentence-transformers' ONNX backend, or the reason it is not available here."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(folder), device="cpu", backend="onnx"), None
    except Exception as exc:  # optimum missing, no exported file and no hub access, ...
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"


def best_of(rounds: int, contenders: list[Contender], workloads: dict[str, tuple[list[str], int]]):
    best = {(c.name, w): 0.0 for c in contenders for w in workloads}
    for _ in range(rounds):
        for c in contenders:
            for w, (texts, bs) in workloads.items():
                best[c.name, w] = max(best[c.name, w], c.throughput(texts, bs))
    return best


def parity(contenders: list[Contender], agree_n: int, reference: str) -> dict[str, dict[str, float]]:
    """Cosine to the reference's vectors, and agreement of a head trained on them, per contender."""
    from headfleet.heads import Examples, train_head

    texts, labels = sms_labelled(agree_n)
    k = int(len(texts) * 0.6)
    vectors = {c.name: c.embed(texts, 64) for c in contenders}
    ref = vectors[reference]
    head = train_head(ref[:k], Examples(texts[:k], labels[:k], multi_label=False), holdout=0).head
    ref_labels = head.predict_proba(ref[k:]).argmax(1)
    out = {}
    for name, v in vectors.items():
        cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
        agree = float((head.predict_proba(v[k:]).argmax(1) == ref_labels).mean())
        out[name] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "head_agreement": agree,
                     "n_holdout": len(texts) - k}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-short", type=int, default=512, help="short texts for the batch-64 figures")
    ap.add_argument("--n-long", type=int, default=256, help="long texts for the batch-64 figures")
    ap.add_argument("--n-single", type=int, default=64, help="texts embedded one call each for batch 1")
    ap.add_argument("--latency-n", type=int, default=200, help="single-text calls for p50/p99")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--agree-n", type=int, default=1500, help="sms_spam rows for parity (60%% train a head)")
    ap.add_argument("--cache-dir", default=None, help="where ONNX exports are kept (default: a temp dir)")
    ap.add_argument("--no-levers", action="store_true")
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="headfleet-onnx-"))
    short = sms_texts(args.n_short)
    long = long_texts(args.n_long)
    workloads = {"short b1": (short[: args.n_single], 1), "short b64": (short, 64),
                 "long b1": (long[: args.n_single], 1), "long b64": (long, 64)}

    t0 = time.perf_counter()
    embedders = {
        "torch fp32": Embedder.load(device="cpu", threads=threads),
        "onnx fp32": Embedder.load(device="cpu", threads=threads, backend="onnx", cache_dir=cache_dir),
        "onnx int8": Embedder.load(device="cpu", threads=threads, backend="onnx", precision="int8",
                                   cache_dir=cache_dir),
    }
    load_s = time.perf_counter() - t0
    folder = embedders["torch fp32"].folder
    contenders = [peer("sentence-transformers", SentenceTransformer(str(folder), device="cpu"))]
    st_onnx, st_onnx_skip = sentence_transformers_onnx(folder)
    if st_onnx is not None:
        contenders.append(peer("sentence-transformers onnx", st_onnx))
    contenders += [ours(k, e) for k, e in embedders.items()]
    for c in contenders:  # warm-up: first calls allocate and, for ONNX Runtime, plan memory
        c.embed(short[:64], 64), c.embed(long[:8], 8), c.embed(short[:1], 1)

    best = best_of(args.rounds, contenders, workloads)
    st = "sentence-transformers"
    rows = [("texts", f"{len(short)} short (SMS, mean {np.mean([len(t) for t in short]):.0f} chars), {len(long)} long "
                      f"(mean {np.mean([len(t) for t in long]):.0f} chars); batch 1 = {args.n_single} single-text "
                      f"calls; best of {args.rounds}; {threads} thread(s)"),
            ("", "short b1 | short b64 | long b1 | long b64  (texts/s)   ratio to ST: short b64 | long b64")]
    for c in contenders:
        figs = " | ".join(f"{best[c.name, w]:7,.0f}" for w in workloads)
        ratio = " | ".join(f"{best[c.name, w] / best[st, w]:.2f}x" for w in ("short b64", "long b64"))
        rows.append((c.name, f"{figs}   {ratio}"))
    if st_onnx_skip:
        rows.append(("sentence-transformers onnx", f"not measured: {st_onnx_skip}"))
    rows.append(("load (export + int8 once)", f"{load_s:.1f} s for the three headfleet embedders, cache {cache_dir}"))
    report("backbone backends: texts/s, all-MiniLM-L6-v2, CPU", rows,
           {f"{c} / {w}": round(v, 1) for (c, w), v in best.items()})

    lat = {c.name: c.latency([short[i % len(short)] for i in range(args.latency_n)]) for c in contenders}
    report("one short text at batch 1: latency", [
        (name, f"p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms  (goal p99 <= 20 ms)") for name, v in lat.items()
    ], {name: {k: round(x, 3) for k, x in v.items()} for name, v in lat.items()})

    par = parity(contenders, args.agree_n, "torch fp32")
    report(f"parity with torch fp32 on sms_spam ({args.agree_n} rows, head on 60%, labels compared on the rest)", [
        (name, f"cosine min {v['cos_min']:.5f} mean {v['cos_mean']:.5f}; head labels agree {v['head_agreement']:.2%} "
               f"of {v['n_holdout']}") for name, v in par.items()
    ], par)

    if not args.no_levers:
        levers(embedders, short, long, threads, cache_dir, args.rounds)


def levers(embedders: dict[str, Embedder], short: list[str], long: list[str], threads: int, cache_dir: Path,
           rounds: int) -> None:
    onnx32, int8, tch = embedders["onnx fp32"], embedders["onnx int8"], embedders["torch fp32"]
    rows, extra = [], {}

    def rate(e: Embedder, texts: list[str], runner=None) -> float:
        saved = e.runner
        if runner is not None:
            e.runner = runner
        e.batch_size = 64
        e.embed(texts[:64])
        best = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            e.embed(texts)
            best = max(best, len(texts) / (time.perf_counter() - t0))
        e.runner = saved
        return best

    # intra-op threads
    counts = sorted({1, 2, threads, os.cpu_count() or 1})
    for t in counts:
        torch.set_num_threads(t)
        figs = {"torch fp32": rate(tch, short)}
        for name, e in (("onnx fp32", onnx32), ("onnx int8", int8)):
            figs[name] = rate(e, short, OrtRunner(e.runner.path, threads=t))
        rows.append((f"threads {t}", ", ".join(f"{k} {v:,.0f}/s" for k, v in figs.items())))
        extra[f"threads {t}"] = figs
    torch.set_num_threads(threads)

    # ONNX Runtime graph optimisation
    for level in ("disabled", "basic", "all"):
        figs = {name: rate(e, short, OrtRunner(e.runner.path, threads=threads, graph_opt=level))
                for name, e in (("onnx fp32", onnx32), ("onnx int8", int8))}
        rows.append((f"graph opt {level}", ", ".join(f"{k} {v:,.0f}/s" for k, v in figs.items())))
        extra[f"graph opt {level}"] = figs

    # length bucketing: the embedder sorts all texts by length before cutting batches; without it,
    # each batch of 64 in arrival order is padded to its longest text
    mixed = [t for pair in zip(short, long) for t in pair]
    for name, e in (("torch fp32", tch), ("onnx int8", int8)):
        sorted_rate = rate(e, mixed)
        t0 = time.perf_counter()
        for i in range(0, len(mixed), 64):
            e.embed(mixed[i : i + 64])
        unsorted_rate = len(mixed) / (time.perf_counter() - t0)
        rows.append((f"length bucketing, {name}", f"sorted {sorted_rate:,.0f}/s vs arrival order {unsorted_rate:,.0f}/s "
                                                 f"on a short/long mix"))
        extra[f"bucketing {name}"] = {"sorted": sorted_rate, "arrival": unsorted_rate}

    # the int8 recipe not shipped: quantize_dynamic (one activation scale per batch)
    source = fingerprint(onnx32.folder, onnx32.pooling)
    dyn_path = model_file(cache_dir, source, "int8-dynamic")
    if not dyn_path.exists():
        quantize_int8_dynamic(model_file(cache_dir, source, "fp32"), dyn_path)
    dyn = OrtRunner(dyn_path, threads=threads)
    probe = short[:256]
    ref = tch.embed(probe).vectors
    for name, runner in (("int8 shipped (MatMulNBits, per-row blocks)", int8.runner), ("int8 quantize_dynamic", dyn)):
        saved = int8.runner
        int8.runner = runner
        int8.batch_size = 64
        v64 = int8.embed(probe).vectors
        v1 = np.stack([int8.embed([t]).vectors[0] for t in probe[:64]])
        int8.runner = saved
        cos = (v64 * ref).sum(1)
        drift = float((v64[:64] * v1).sum(1).min())
        r = rate(int8, short, runner)
        rows.append((name, f"{r:,.0f}/s short b64; cosine to torch min {cos.min():.4f} mean {cos.mean():.4f}; "
                           f"same text batch 1 vs 64: cosine min {drift:.5f}"))
        extra[name] = {"texts_per_s": r, "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                       "batch_drift_cos_min": drift}
    report("levers on the miss path (short texts, batch 64, texts/s)", rows, extra)


if __name__ == "__main__":
    main()
