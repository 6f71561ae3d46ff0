"""LoRA tenants: a mixed batch against PEFT, adapter cold loads, bytes stored per tenant.

    python bench/lora.py                      # all three parts
    python bench/lora.py --rows 32 --adapters 32 --rank 8 --repeats 20

(a) ``rows`` real SMS texts, each with its own adapter among ``adapters`` distinct rank-``rank``
    adapters on all-MiniLM-L6-v2 (query, value), pooled and normalised embeddings:
      - ours, on the backend a new data folder gets here (``--backend``; on a CPU ONNX Runtime, whose
        LoRA rows run in the graph with the delta inside), and on torch fp32: one forward of the
        embedder, adapters resident in device slots (the serving path)
      - PEFT mixed batch: ``model(..., adapter_names=[...])``, one forward, adapters loaded in PEFT
      - per-adapter loop: PEFT ``set_adapter`` + a forward for each adapter's rows
    Every path's vectors are checked against PEFT's first (atol 1e-4 at fp32; cosine >= 0.99 on a
    quantised base). Then each runtime is timed in its own process (ONNX Runtime: ours with and
    without adapters; torch: ours with and without, PEFT mixed, the PEFT loop), the two processes
    alternated over ``rounds``: in one process the median of ``repeats`` rounds after a warm-up,
    each round running every contender once; of the processes, the best round of each contender.
    Ratio = peer / ours (> 1: ours faster). The LoRA delta (what adapters add to the same texts'
    forward) is given per process as the median over its rounds of with / without, each pair
    timed back to back.
(b) cold load: an adapter not in host memory nor in a slot, read from the registry folder (PEFT
    files), checked against the backbone's shapes and copied into a device slot; p50/p99 over
    ``loads`` distinct adapters (the goal is p99 <= 50 ms for rank 8).
(c) bytes on disk per LoRA tenant (adapter + head) against a full copy of the fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import begin, check_close, percentiles_ms, refuse, report, sms_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--loads", type=int, default=200, help="cold loads measured in (b)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip", default="", help="parts to skip, e.g. 'a' or 'bc'")
    p.add_argument("--rounds", type=int, default=3, help="(a): processes per runtime, alternated; best round")
    p.add_argument("--family", choices=["onnx", "torch"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX exports (default: a new temporary folder)")
    p.add_argument("--backend", default=None,
                   help="backend/precision of (a)'s first row, e.g. onnx/w8a8 or onnx/fp32 (default: what a new "
                        "data folder gets on this machine, headfleet.settings.fast_default); torch fp32 is always measured")
    return p.parse_args(argv)


def random_adapters(n: int, rank: int, shapes: dict, seed: int = 0):
    from headfleet.heads.adapters import LoraAdapter

    rng = np.random.default_rng(seed)
    names = sorted(k for k in shapes if k.endswith((".query", ".value")))
    return [LoraAdapter(rank=rank, alpha=2.0 * rank, use_rslora=False, targets=["query", "value"],
                        A={k: rng.normal(0, 0.05, (shapes[k][0], rank)).astype(np.float32) for k in names},
                        B={k: rng.normal(0, 0.05, (rank, shapes[k][1])).astype(np.float32) for k in names})
            for _ in range(n)]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each of ``fns`` over ``repeats`` rounds, each round calling every one once.
    One runtime per process: right after a torch forward an ONNX Runtime forward in the same
    process ran ~1.45x slower (214 vs 148 ms here, even 0.5 s later), so ``part_a`` times torch and
    ONNX Runtime contenders in separate processes."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in (fns.items() if r % 2 == 0 else reversed(fns.items())):  # neither always goes first
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    # the LoRA delta as the median over rounds of (with adapters / without) in the same round: the
    # two ran back to back (in alternating order), so a drift of the machine between rounds (10-25 %
    # here) cancels out
    for name in fns:
        if name + " base" in times:
            out[name + " delta"] = statistics.median(a / b for a, b in zip(times[name], times[name + " base"])) - 1
    return out


def peft_model(folder, adapters):
    """PEFT's model over the backbone in ``folder`` with every adapter loaded as ``a<k>``."""
    from peft import PeftModel
    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        for k, ad in enumerate(adapters):
            sub = Path(tmp) / f"a{k}"
            sub.mkdir()
            for name, data in ad.to_files().items():
                (sub / name).write_bytes(data)
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(folder)).eval(), str(Path(tmp) / "a0"),
                                          adapter_name="a0")
        for k in range(1, len(adapters)):
            model.load_adapter(str(Path(tmp) / f"a{k}"), adapter_name=f"a{k}")
    return model.eval()


def peft_calls(model, emb, texts, slots):
    """``(mixed, loop)``: PEFT's mixed batch (``adapter_names=``) and its per-adapter loop, each
    returning pooled, normalised [rows, dim] vectors."""
    from headfleet.embedder.backbone import pool

    ids = [e.ids[: emb.max_length] for e in emb.tokenizer.encode_batch(texts)]
    input_ids = torch.zeros((len(ids), max(map(len, ids))), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    names = [f"a{s}" for s in slots]

    def mixed():
        with torch.inference_mode():
            h = model(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids),
                      adapter_names=names).last_hidden_state
            return pool(h, mask, emb.pooling).numpy()

    def loop():
        out = np.empty((len(texts), emb.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in sorted(set(slots.tolist())):
                rows = np.flatnonzero(slots == s)
                model.set_adapter(f"a{s}")
                sub_ids, sub_mask = input_ids[rows], mask[rows]
                w = int(sub_mask.sum(1).max())
                h = model(input_ids=sub_ids[:, :w], attention_mask=sub_mask[:, :w],
                          token_type_ids=torch.zeros_like(sub_ids[:, :w])).last_hidden_state
                out[rows] = pool(h, sub_mask[:, :w], emb.pooling).numpy()
        return out

    return mixed, loop


def load_embedders(args, family: str | None = None):
    """``[(label, embedder with LoRA enabled)]``: the default backend first (when it is not torch),
    then torch fp32; ``family`` ("onnx" / "torch") keeps one of them."""
    from headfleet.embedder import Embedder

    slots, rank = max(args.adapters, 8), max(8, args.rank)
    backend, precision = backend_of(args)
    embs = []
    if backend != "torch" and family in (None, "onnx"):
        fast = Embedder.load(max_length=128, batch_size=max(64, args.rows), device="cpu", backend=backend,
                             precision=precision, cache_dir=args.cache_dir)
        fast.enable_lora(max_slots=slots, max_rank=rank)
        embs.append((f"{backend} {precision}", fast))
    if family in (None, "torch"):
        emb = Embedder.load(max_length=128, batch_size=max(64, args.rows), device="cpu")
        emb.enable_lora(max_slots=slots, max_rank=rank)
        embs.append(("torch fp32", emb))
    return embs


def adapters_for(args, embs):
    from headfleet.embedder.lora import module_shapes

    adapters = random_adapters(args.adapters, args.rank, module_shapes(embs[0][1].torch_model()))
    for _, e in embs:
        for s, ad in enumerate(adapters):
            e.lora.write(s, ad.torch_weights("cpu"), ad.rank, ad.scale)
    return adapters


def time_family(args) -> int:
    """One process's timing of one runtime's contenders (``--family``): prints ``FAMILY <json>``,
    the median ms of each over ``repeats`` alternated rounds."""
    embs = load_embedders(args, args.family)
    adapters = adapters_for(args, embs)
    texts, slots = sms_texts(args.rows), np.arange(args.rows) % args.adapters
    fns = {}
    for label, e in embs:
        fns[label] = lambda e=e: e.embed(texts, slots=slots)
        fns[label + " base"] = lambda e=e: e.embed(texts)
    if args.family == "torch":
        mixed, loop = peft_calls(peft_model(embs[0][1].folder, adapters), embs[0][1], texts, slots)
        fns["PEFT mixed"] = mixed
    med = interleaved_ms(fns, args.repeats)
    if args.family == "torch":
        med["PEFT loop"] = median_ms(loop, max(3, args.repeats // 4))
    print("FAMILY " + json.dumps(med), flush=True)
    return 0


def part_a(args, texts):
    """Checks every contender's vectors in this process, then times each runtime in its own
    process (``time_family``), the runtimes alternated over ``rounds``; the best round of each."""
    embs = load_embedders(args)
    adapters = adapters_for(args, embs)
    slots = np.arange(args.rows) % len(adapters)
    emb = embs[-1][1]
    mixed, loop = peft_calls(peft_model(emb.folder, adapters), emb, texts, slots)
    theirs = mixed()
    checked = [check_close("PEFT per-adapter loop vs PEFT mixed", loop(), theirs, 1e-4)]
    for label, e in embs:
        ours = e.embed(texts, slots=slots).vectors
        if e.backend == "torch" or e.precision == "fp32":  # the same arithmetic: equal to float rounding
            checked.append(check_close(f"{label} vs PEFT mixed", ours, theirs, 1e-4))
        else:  # a quantised base: as close as its plain rows are (parity.py), no closer
            cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
            if not cos.min() >= 0.99:
                refuse(f"{label} vs PEFT mixed: lowest cosine {cos.min():.4f} < 0.99")
            checked.append(f"{label} vs PEFT mixed: cosine min {cos.min():.5f}, mean {cos.mean():.5f} (bound 0.99)")
    print("\n".join(checked), flush=True)
    del embs, emb, mixed, loop
    families = (["onnx"] if backend_of(args)[0] != "torch" else []) + ["torch"]
    rounds: dict[str, list[float]] = {}  # ms per process
    deltas: dict[str, list[float]] = {}  # "<label> delta": each process's median paired ratio - 1
    for r in range(args.rounds):
        for family in families:
            cmd = [sys.executable, __file__, "--family", family, "--rows", str(args.rows), "--adapters",
                   str(args.adapters), "--rank", str(args.rank), "--repeats", str(args.repeats),
                   "--cache-dir", str(args.cache_dir)] + (["--backend", args.backend] if args.backend else []) + \
                  (["--threads", str(args.threads)] if args.threads else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("FAMILY ")), None)
            if done.returncode or line is None:
                refuse(f"the {family} timing process failed (rc {done.returncode}): {done.stderr[-2000:]}")
            timed = json.loads(line[len("FAMILY "):])
            for name, value in timed.items():
                (deltas if name.endswith(" delta") else rounds).setdefault(name, []).append(value)
            print(f"  round {r + 1}, {family}: " + ", ".join(f"{k} {100 * v:+.1f} %" if k.endswith(" delta") else
                                                            f"{k} {v:.1f}" for k, v in timed.items()), flush=True)
    best = {name: min(v) for name, v in rounds.items()}
    mixed_ms, loop_ms = best["PEFT mixed"], best["PEFT loop"]
    labels = [name for name in best if not name.endswith(" base") and not name.startswith("PEFT")]
    rows, figures = [], {"threads": args.threads or torch.get_num_threads(), "rounds": rounds, "deltas": deltas}
    for k, label in enumerate(labels):
        ours_ms, base_ms = best[label], best[label + " base"]
        key = "" if k == 0 else f"{label}_"
        # the delta within each process (both timed alternately there: the median of paired
        # ratios, interleaved_ms), not best against best
        shares = deltas[label + " delta"]
        rows += [(f"ours, {label}", f"{ours_ms:8.1f} ms  -> {mixed_ms / ours_ms:.2f}x PEFT mixed, "
                                    f"{loop_ms / ours_ms:.2f}x the loop"),
                 ("  same texts, no adapters", f"{base_ms:8.1f} ms  (LoRA adds {ours_ms - base_ms:+.1f} ms best "
                                              f"against best; in each process, the median of paired "
                                              f"runs: " + ", ".join(f"{100 * x:+.1f} %" for x in shares) + ")")]
        figures[f"{key}delta_shares"] = shares
        figures[f"{key}delta_median"] = statistics.median(shares)
        figures.update({f"{key}ours_ms": ours_ms, f"{key}base_ms": base_ms, f"{key}vs_peft": mixed_ms / ours_ms,
                        f"{key}delta_best_vs_best": (ours_ms - base_ms) / base_ms, f"{key}vs_loop": loop_ms / ours_ms})
    rows += [("PEFT mixed batch", f"{mixed_ms:8.1f} ms"), ("per-adapter loop (PEFT)", f"{loop_ms:8.1f} ms")]
    figures.update({"peft_mixed_ms": mixed_ms, "loop_ms": loop_ms, "default": labels[0]})
    report(f"(a) {args.rows} rows across {args.adapters} adapters, rank {args.rank}, one batch (first row: the "
           f"default backend; each runtime in its own process, best of {args.rounds} rounds)",
           rows + [("checked before timing", line) for line in checked], figures)


def backend_of(args) -> tuple[str, str]:
    """``(backend, precision)`` of (a)'s first row: ``--backend``, else what a new data folder gets."""
    from headfleet.settings import fast_default

    backend, _, precision = (args.backend or "").partition("/")
    return (backend, precision) if backend else fast_default("cpu")


def part_bc(args, emb, shapes):
    from headfleet.heads import examples_from_records
    from headfleet.heads.types import HeadArrays
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    n = args.loads
    adapters = random_adapters(n, args.rank, shapes, seed=1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        eng = Engine.open(Settings(data_dir=Path(tmp), device="cpu", lora_slots=8, lora_max_rank=max(8, args.rank),
                                   lora_max_loaded=8, faiss_store=False), embedder=emb)
        manager = eng.adapter_manager()
        data = examples_from_records([{"text": t, "label": lab} for t, lab in zip(sms_texts(4), "abab")])
        aids = []
        for k, ad in enumerate(adapters):
            head = HeadArrays("logreg", ["a", "b"], False, rng.normal(0, 1, (2, emb.dim)), np.zeros(2))
            m = eng.save_lora(f"t{k:04d}", "mine", ad, head, data)
            aids.append(f"t{k:04d}/mine@1#{m['adapter']['sha256'][:16]}")
        folder = eng.registry.version_dir("t0000", eng.registry.resolve("t0000", "mine"))
        tenant_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name != "training_data.jsonl.gz")
        data_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name == "training_data.jsonl.gz")
        times = []
        for aid in aids:  # every one cold: 8 slots, 8 in host memory, 200 distinct adapters in turn
            t0 = time.perf_counter()
            manager.acquire([aid], eng._load_adapter)
            times.append(time.perf_counter() - t0)
            manager.release([aid])
        snap = manager.snapshot()
        eng.close()
    if snap["disk_loads"] != n:  # every timed acquire must have been a cold load, or p50/p99 measure something else
        refuse(f"{snap['disk_loads']} of {n} timed acquires read the adapter from disk: {snap}")
    pct = percentiles_ms(times)
    report(f"(b) adapter cold load, rank {args.rank} MiniLM (registry folder -> host -> device slot)", [
        ("p50", f"{pct['p50_ms']:.2f} ms"), ("p99", f"{pct['p99_ms']:.2f} ms  (goal <= 50 ms)"),
        ("loads", f"{n} distinct adapters, 8 slots, host LRU of 8"),
    ], pct)
    model_bytes = sum(p.stat().st_size for p in emb.folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    report("(c) bytes stored per LoRA tenant", [
        ("adapter + head + manifest", f"{tenant_bytes / 1024:.1f} KiB"),
        ("  (+ its training data)", f"{data_bytes / 1024:.1f} KiB, for retraining"),
        ("a full fine-tuned copy", f"{model_bytes / 2**20:.1f} MiB -> {model_bytes / tenant_bytes:.0f}x more"),
    ], {"tenant_bytes": tenant_bytes, "model_bytes": model_bytes})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_dir is None:
        args.cache_dir = Path(tempfile.mkdtemp(prefix="bench-lora-onnx-"))
    if args.family:
        return time_family(args)
    begin("LoRA tenants: mixed batch vs PEFT, cold loads, bytes per tenant")
    from headfleet.embedder import Embedder
    from headfleet.embedder.lora import module_shapes

    texts = sms_texts(args.rows)
    if "a" not in args.skip:
        part_a(args, texts)
    if "b" not in args.skip:
        emb = Embedder.load(max_length=128, batch_size=max(64, args.rows), device="cpu")
        emb.enable_lora(max_slots=max(args.adapters, 8), max_rank=max(8, args.rank))
        part_bc(args, emb, module_shapes(emb.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
