"""Throughput levers on the miss path, each measured as a ratio (lever on / lever off) in one run.

Every comparison first runs each side once and compares their outputs (vectors: cosine >= 0.9999
on every text, int8 across graph-optimisation levels >= 0.998; token ids: equal), and stops without
a figure when they differ; then it alternates the two sides over ``--rounds`` rounds and keeps each
side's best round, so a burst of load from other work on the machine hits both sides rather than one.

- length bucketing: one ``embed`` call that sorts all texts by length before cutting batches of 64
  (ours) vs the same texts in arrival order, each batch of 64 padded to its longest text; on a
  short/long mix (SMS interleaved with ~250-character texts);
- intra-op threads: 2 vs 1 (torch ``set_num_threads``, ONNX Runtime ``intra_op_num_threads``), at
  batch 64 and for one short text at batch 1;
- tokenizer batching: ``Tokenizer.encode_batch`` (ours) vs ``encode`` per text, alone and as a share
  of the whole miss path;
- ONNX Runtime graph optimisation: "all" (ours) vs "basic" vs "disabled";
- ``torch.compile`` (inductor, dynamic shapes) of the torch fp32 backbone vs eager, with its compile time.

    .venv/bin/python bench/levers.py [--n-short 512] [--n-long 256] [--rounds 3] [--cache-dir DIR] [--no-compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import begin, check_labels, check_vectors, long_texts, report, sms_texts
from headfleet.embedder import Embedder
from headfleet.embedder.embedder import TorchRunner
from headfleet.embedder.onnx_backend import OrtRunner


CHECKED: list[str] = []


def checked_pair(rounds: int, what: str, a, b, min_cosine: float = 0.9999) -> tuple[float, float]:
    """Run each side once and compare what they return (vectors by cosine, anything else for
    equality), refusing when they differ; then ``best_pair``."""
    out_a, out_b = a(), b()
    if isinstance(out_a, np.ndarray):
        CHECKED.append(check_vectors(what, out_a, out_b, min_cosine))
    else:
        CHECKED.append(check_labels(what, out_a, out_b, 1.0))
    return best_pair(rounds, a, b)


def best_pair(rounds: int, a, b) -> tuple[float, float]:
    """Best rate (units/s) of each of two callables returning what they computed (one item per unit), alternated."""
    best_a = best_b = 0.0
    for _ in range(rounds):
        best_a = max(best_a, _rate(a))
        best_b = max(best_b, _rate(b))
    return best_a, best_b


def best_rate(rounds: int, fn) -> float:
    return max(_rate(fn) for _ in range(rounds))


def _rate(fn) -> float:
    t0 = time.perf_counter()
    units = len(fn())
    return units / (time.perf_counter() - t0)


def embed_all(e: Embedder, texts: list[str], batch: int = 64):
    def run() -> np.ndarray:
        e.batch_size = batch
        return e.embed(texts).vectors
    return run


def embed_arrival_order(e: Embedder, texts: list[str], batch: int = 64):
    def run() -> np.ndarray:
        e.batch_size = batch
        # one batch per call: padded to the longest of these 64
        return np.concatenate([e.embed(texts[i : i + batch]).vectors for i in range(0, len(texts), batch)])
    return run


def embed_one_by_one(e: Embedder, texts: list[str]):
    def run() -> np.ndarray:
        e.batch_size = 1
        return np.concatenate([e.embed([t]).vectors for t in texts])
    return run


def with_runner(e: Embedder, runner, fn):
    def run():
        saved = e.runner
        e.runner = runner
        try:
            return fn()
        finally:
            e.runner = saved
    return run


def with_torch_threads(n: int, fn):
    def run():
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(saved)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-short", type=int, default=512)
    ap.add_argument("--n-long", type=int, default=256)
    ap.add_argument("--n-single", type=int, default=64, help="single-text calls for the batch-1 figures")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", default=None, help="ONNX exports (default: a temp dir)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compiling)")
    args = ap.parse_args()
    begin("levers on the miss path")
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="headfleet-onnx-"))
    threads = torch.get_num_threads()
    short, long = sms_texts(args.n_short), long_texts(args.n_long)
    mixed = [t for pair in zip(short, long) for t in pair] + short[len(long):]
    single = short[: args.n_single]
    emb = {
        "torch fp32": Embedder.load(device="cpu"),
        "onnx fp32": Embedder.load(device="cpu", backend="onnx", cache_dir=cache_dir),
        "onnx int8": Embedder.load(device="cpu", backend="onnx", precision="int8", cache_dir=cache_dir),
    }
    for e in emb.values():  # warm-up
        e.batch_size = 64
        e.embed(short[:64]), e.embed(long[:16]), e.embed(short[:1])
    rows, extra = [], {}

    def add(lever: str, on: str, off: str, a: float, b: float, unit: str = "texts/s") -> None:
        rows.append((lever, f"{on} {a:,.0f} vs {off} {b:,.0f} {unit}: {a / b:.2f}x"))
        extra[lever] = {on: round(a, 1), off: round(b, 1), "ratio": round(a / b, 3)}

    # length bucketing
    for name, e in emb.items():
        a, b = checked_pair(args.rounds, f"length bucketing, {name}", embed_all(e, mixed), embed_arrival_order(e, mixed))
        add(f"length bucketing, {name}", "sorted", "arrival order", a, b)

    # intra-op threads
    for name, e in emb.items():
        for label, fn in (("batch 64", embed_all(e, short)), ("batch 1", embed_one_by_one(e, single))):
            if e.backend == "torch":
                two, one = with_torch_threads(2, fn), with_torch_threads(1, fn)
            else:
                path = e.runner.path
                two, one = with_runner(e, OrtRunner(path, threads=2), fn), with_runner(e, OrtRunner(path, threads=1), fn)
            a, b = checked_pair(args.rounds, f"threads, {name}, short {label}", two, one)
            add(f"threads, {name}, short {label}", "2 threads", "1 thread", a, b)

    # tokenizer batching
    tok = emb["torch fp32"].tokenizer
    for label, texts in (("short", short), ("long", long)):
        def batched(texts=texts) -> list[list[int]]:
            return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=True)]

        def one_by_one(texts=texts) -> list[list[int]]:
            return [tok.encode(t, add_special_tokens=True).ids for t in texts]

        a, b = checked_pair(args.rounds, f"tokenizer batching, {label} (token ids)", batched, one_by_one)
        add(f"tokenizer batching, {label}", "encode_batch", "encode per text", a, b)
        full = best_rate(args.rounds, embed_all(emb["onnx int8"], texts))
        rows.append(("", f"tokenising is {full / a:.1%} of the onnx int8 miss path on {label} texts "
                         f"({full / b:.1%} per text)"))
        extra[f"tokenizer share, {label}"] = {"batched": full / a, "per_text": full / b}

    # ONNX Runtime graph optimisation
    for name in ("onnx fp32", "onnx int8"):
        e = emb[name]
        runners = {lvl: OrtRunner(e.runner.path, threads=threads, graph_opt=lvl) for lvl in ("all", "basic", "disabled")}
        for off in ("basic", "disabled"):
            a, b = checked_pair(args.rounds, f"graph opt, {name}, all vs {off}",
                                with_runner(e, runners["all"], embed_all(e, short)),
                                with_runner(e, runners[off], embed_all(e, short)),
                                0.998 if e.precision == "int8" else 0.9999)
            add(f"graph opt, {name}, short b64, all vs {off}", "all", off, a, b)

    # torch.compile
    if not args.no_compile:
        e = emb["torch fp32"]
        try:
            t0 = time.perf_counter()
            compiled = TorchRunner(torch.compile(e.model, dynamic=True), e.pooling, "cpu")
            warm = with_runner(e, compiled, embed_all(e, short))
            warm(), with_runner(e, compiled, embed_all(e, long))(), with_runner(e, compiled, embed_one_by_one(e, short[:4]))()
            compile_s = time.perf_counter() - t0
            for label, fn in (("short b64", lambda: embed_all(e, short)), ("long b64", lambda: embed_all(e, long)),
                              ("short b1", lambda: embed_one_by_one(e, single))):
                a, b = checked_pair(args.rounds, f"torch.compile, {label}", with_runner(e, compiled, fn()), fn())
                add(f"torch.compile, {label}", "compiled", "eager", a, b)
            rows.append(("", f"compile + warm-up {compile_s:.0f} s"))
            extra["torch.compile"] = {"compile_s": compile_s}
        except Exception as exc:  # no compiler, an inductor failure: say so, do not hide it
            rows.append(("torch.compile", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))

    rows += [("checked before timing", line) for line in CHECKED]
    report(f"levers on the miss path (ratios: lever on / off, best of {args.rounds} alternated rounds; "
           f"{len(short)} short, {len(long)} long texts; torch default {threads} threads)", rows, extra)


if __name__ == "__main__":
    main()
