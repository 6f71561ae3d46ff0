"""Backbone backends side by side: headfleet's torch fp32, ONNX fp32 and ONNX int8 against
sentence-transformers ``encode`` (and its own ONNX backend where it installs) and fastembed, the
ONNX Runtime embedder CPU users pick (the shipped model exported to ONNX in a local folder: no
download).

Same model folder, same texts, same thread count, same process. Throughput is texts/s on short
(SMS) and long (~250-character) texts, at batch 1 (one call per text, as a lone request) and at
batch 64; the contenders alternate over several rounds and the best round of each is kept. Then
p50/p99 latency of one short text at batch 1. Before any timed round every contender embeds all the
short and long texts once and its vectors are compared with headfleet torch fp32's: cosine >= 0.9999
on every text (int8: >= 0.99, the bound tests/embedder/test_onnx_backend.py holds it to), or the
bench stops without a figure. Parity with torch fp32 (cosine, head labels) is
``bench/parity.py``; the levers on the miss path are ``bench/levers.py``.

    .venv/bin/python bench/backends.py [--n-short 512] [--n-long 256] [--n-single 64] \
        [--latency-n 200] [--rounds 3] [--threads N] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import begin, check_vectors, long_texts, percentiles_ms, report, sms_texts
from headfleet.embedder import Embedder
from headfleet.settings import CPU_ONLY


class Contender:
    def __init__(self, name: str, embed, min_cosine: float = 0.9999):
        self.name = name
        self.embed = embed  # (texts, batch_size) -> [n, dim] float32
        self.min_cosine = min_cosine  # against headfleet torch fp32, checked before timing

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

    return Contender(name, embed, 0.99 if e.precision in CPU_ONLY else 0.9999)


def peer(name: str, model) -> Contender:
    return Contender(name, lambda texts, bs: model.encode(texts, batch_size=bs, convert_to_numpy=True))


def sentence_transformers_onnx(folder: Path):
    """sentence-transformers' ONNX backend, or the reason it is not available here."""
    import importlib.util

    from sentence_transformers import SentenceTransformer

    if importlib.util.find_spec("optimum") is None:
        import transformers

        return None, ("its [onnx] extra needs optimum-onnx, whose releases pin transformers < 4.58; installing it "
                      f"would downgrade transformers {transformers.__version__}, so it is not installed")
    try:
        return SentenceTransformer(str(folder), device="cpu", backend="onnx"), None
    except Exception as exc:  # optimum missing, no exported file and no hub access, ...
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"


def fastembed_contender(folder: Path, cache_dir: Path, threads: int):
    """fastembed's ``TextEmbedding`` for all-MiniLM-L6-v2 on a plain ONNX export of the shipped
    weights (token embeddings out; fastembed pools and normalises), or the reason it is not available."""
    import shutil

    try:
        from fastembed import TextEmbedding
    except ImportError:
        return None, "fastembed is not installed (scripts/setup bench installs it)"
    from transformers import BertModel

    out = cache_dir / "fastembed-all-MiniLM-L6-v2"
    if not (out / "model.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        bert = BertModel.from_pretrained(folder).eval()

        class TokenEmbeddings(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        model = TokenEmbeddings()
        ids = torch.ones(2, 16, dtype=torch.long)
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
        with torch.inference_mode():
            torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / "model.onnx"),
                              dynamo=False, opset_version=17, dynamic_axes=axes,
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["last_hidden_state"])
        for name in ("tokenizer.json", "config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(Path(folder) / name, out / name)
    model = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", specific_model_path=str(out), threads=threads)
    return Contender("fastembed", lambda texts, bs: np.stack(list(model.embed(texts, batch_size=bs)))), None


def best_of(rounds: int, contenders: list[Contender], workloads: dict[str, tuple[list[str], int]]):
    best = {(c.name, w): 0.0 for c in contenders for w in workloads}
    for _ in range(rounds):
        for c in contenders:
            for w, (texts, bs) in workloads.items():
                best[c.name, w] = max(best[c.name, w], c.throughput(texts, bs))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-short", type=int, default=512, help="short texts for the batch-64 figures")
    ap.add_argument("--n-long", type=int, default=256, help="long texts for the batch-64 figures")
    ap.add_argument("--n-single", type=int, default=64, help="texts embedded one call each for batch 1")
    ap.add_argument("--latency-n", type=int, default=200, help="single-text calls for p50/p99")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="where ONNX exports are kept (default: a temp dir)")
    args = ap.parse_args()
    begin("backbone backends: texts/s, all-MiniLM-L6-v2, CPU")

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
        "onnx w8a8": Embedder.load(device="cpu", threads=threads, backend="onnx", precision="w8a8",
                                   cache_dir=cache_dir),
    }
    load_s = time.perf_counter() - t0
    folder = embedders["torch fp32"].folder
    contenders = [peer("sentence-transformers", SentenceTransformer(str(folder), device="cpu"))]
    st_onnx, st_onnx_skip = sentence_transformers_onnx(folder)
    if st_onnx is not None:
        contenders.append(peer("sentence-transformers onnx", st_onnx))
    fe, fe_skip = fastembed_contender(folder, cache_dir, threads)
    if fe is not None:
        contenders.append(fe)
    contenders += [ours(k, e) for k, e in embedders.items()]
    # checked before timing (and the warm-up: first calls allocate and, for ONNX Runtime, plan memory)
    reference = {name: ours("torch fp32", embedders["torch fp32"]).embed(texts, 64)
                 for name, texts in (("short", short), ("long", long))}
    checked = []
    for c in contenders:
        for name, texts in (("short", short), ("long", long)):
            checked.append(check_vectors(f"{c.name} vs headfleet torch fp32, {name}", c.embed(texts, 64),
                                         reference[name], c.min_cosine))
        single = np.stack([c.embed([t], 1)[0] for t in short[: min(8, len(short))]])  # batch 1 is another path
        checked.append(check_vectors(f"{c.name} vs headfleet torch fp32, batch 1", single,
                                     reference["short"][: len(single)], c.min_cosine))
    print("\n".join(checked), flush=True)

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
    if fe_skip:
        rows.append(("fastembed", f"not measured: {fe_skip}"))
    rows.append(("load (export + int8 once)", f"{load_s:.1f} s for the three headfleet embedders, cache {cache_dir}"))
    rows += [("checked before timing", line) for line in checked]
    report("backbone backends: texts/s, all-MiniLM-L6-v2, CPU", rows,
           {f"{c} / {w}": round(v, 1) for (c, w), v in best.items()})

    lat = {c.name: c.latency([short[i % len(short)] for i in range(args.latency_n)]) for c in contenders}
    report("one short text at batch 1: latency", [
        (name, f"p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms  (goal p99 <= 20 ms)") for name, v in lat.items()
    ], {name: {k: round(x, 3) for k, x in v.items()} for name, v in lat.items()})


if __name__ == "__main__":
    main()
