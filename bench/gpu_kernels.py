"""Triton kernels against torch peers on a CUDA GPU, measured in the same run.

    python bench/gpu_kernels.py                       # defaults below
    python bench/gpu_kernels.py --rows 32,128,512 --adapters 32 --ranks 8,16 --hidden 384,768 --dtype fp16

LoRA (``y[i] += scale[s] * (x[i] @ A[s]) @ B[s]``, rows = tokens spread over adapters, some with
no adapter): ours (one fused Triton launch) against
  - reference: ``headfleet.kernels.reference`` (torch, sort + one pair of matmuls per slot present)
  - loop: a per-adapter loop with row indices prepared beforehand (PEFT's mixed-batch shape)
  - gather-bmm: each row's A and B gathered and two bmm's (Punica's BGMV written in torch)
Heads (softmax/sigmoid of the heads each row asked for): ours against the reference (one matmul
per asked head) and a dense peer (all heads' logits in one matmul, then gather + activation).

Every case is checked before it is timed: ours and every peer against the reference, within the
dtype's tolerance (the kernel tests' (atol, rtol)); a miss stops the bench with no figure.
Times: triton.testing.do_bench,
median ms over CUDA events (L2 flushed between calls); ratio = peer / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import begin, refuse, report

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (atol, rtol) per dtype, as tests/kernels/kernel_helpers.py holds the kernels to (fp32 a little
# looser: TF32-free but another summation order than the reference over wider rows)
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (6e-2, 2e-2)}


def check(what: str, got: torch.Tensor, want: torch.Tensor, dtype: str) -> float:
    """Refuse unless ``got`` is within the dtype's tolerance of ``want``; returns max |error|."""
    atol, rtol = TOLERANCE[dtype]
    got, want = got.float(), want.float()
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=rtol):
        refuse(f"{what}: max |error| {err:.2e} against the reference, outside atol {atol}, rtol {rtol} ({dtype})")
    return err


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=ints, default=[32, 128, 512], help="rows (tokens) per batch, comma-separated")
    p.add_argument("--adapters", type=ints, default=[32], help="distinct adapters in the batch = slots")
    p.add_argument("--ranks", type=ints, default=[8, 16], help="LoRA ranks, comma-separated")
    p.add_argument("--hidden", type=ints, default=[384, 768], help="hidden_in = hidden_out, comma-separated")
    p.add_argument("--no-adapter", type=float, default=0.125, help="fraction of rows with slot -1")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--heads", type=int, default=1000, help="heads in the fleet (heads bench)")
    p.add_argument("--heads-per-row", type=int, default=3)
    p.add_argument("--labels", type=ints, default=[2, 3, 5], help="label counts, cycled over the heads")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time, ms")
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--skip-heads", action="store_true")
    return p.parse_args(argv)


def lora_inputs(rows: int, n_adapters: int, rank: int, hidden: int, dtype: torch.dtype, no_adapter: float) -> dict:
    dev = "cuda"
    slots = torch.randint(0, n_adapters, (rows,), device=dev, dtype=torch.int32)
    slots[torch.rand(rows, device=dev) < no_adapter] = -1
    return {
        "y": torch.randn(rows, hidden, device=dev, dtype=dtype),
        "x": torch.randn(rows, hidden, device=dev, dtype=dtype),
        "A": (torch.randn(n_adapters, hidden, rank, device=dev) / hidden ** 0.5).to(dtype),
        "B": (torch.randn(n_adapters, rank, hidden, device=dev) / rank ** 0.5 * 0.01).to(dtype),
        "slots": slots,
        "ranks": torch.full((n_adapters,), rank, device=dev, dtype=torch.int32),
        "scales": torch.full((n_adapters,), 2.0, device=dev),
    }


def loop_peer(inp: dict):
    """Per-adapter loop over prepared row indices: what a batch with one adapter per group costs."""
    slots = inp["slots"].tolist()
    per = {}
    for i, s in enumerate(slots):
        if s >= 0:
            per.setdefault(s, []).append(i)
    groups = [(s, torch.tensor(idx, device="cuda"), float(inp["scales"][s])) for s, idx in sorted(per.items())]
    y, x, A, B = inp["y"], inp["x"], inp["A"], inp["B"]

    def run():
        for s, idx, scale in groups:
            y.index_add_(0, idx, (x[idx] @ A[s]) @ B[s], alpha=scale)
    return run


def gather_bmm_peer(inp: dict):
    """Each row's adapter gathered ([rows, hidden, rank] copies), two bmm's, no-adapter rows masked."""
    y, x, A, B, slots, scales = (inp[k] for k in ("y", "x", "A", "B", "slots", "scales"))
    on = slots >= 0
    idx = slots.clamp(min=0).long()

    def run():
        t = torch.bmm(x[:, None, :], A[idx])  # [rows, 1, rank]
        d = torch.bmm(t, B[idx])[:, 0, :] * (scales[idx] * on)[:, None].to(x.dtype)
        y.add_(d)
    return run


def bench_lora(args: argparse.Namespace, do_bench) -> None:
    from headfleet.kernels import lora, reference
    from headfleet.kernels.layout import group_rows_by_slot

    dtype = DTYPES[args.dtype]
    table, records = [], []
    for hidden in args.hidden:
        for rank in args.ranks:
            for n_adapters in args.adapters:
                for rows in args.rows:
                    inp = lora_inputs(rows, n_adapters, rank, hidden, dtype, args.no_adapter)
                    name = f"h{hidden} r{rank} a{n_adapters} rows{rows}"
                    want = reference.lora_shrink_expand(**{**inp, "y": inp["y"].clone()})
                    err = check(f"lora {name}: ours", lora.lora_shrink_expand(**{**inp, "y": inp["y"].clone()}),
                                want, args.dtype)
                    for peer_name, make in (("loop", loop_peer), ("gather-bmm", gather_bmm_peer)):
                        fresh = {**inp, "y": inp["y"].clone()}
                        make(fresh)()  # in place on fresh["y"]
                        check(f"lora {name}: {peer_name}", fresh["y"], want, args.dtype)
                    groups = group_rows_by_slot(inp["slots"], n_adapters)  # once per batch, as in a forward
                    t = {
                        "ours": do_bench(lambda: lora.lora_shrink_expand(**inp, groups=groups, validate=False),
                                         warmup=args.warmup, rep=args.rep),
                        "ours+grouping": do_bench(lambda: lora.lora_shrink_expand(**inp, validate=False),
                                                  warmup=args.warmup, rep=args.rep),
                        "reference": do_bench(lambda: reference.lora_shrink_expand(**inp, validate=False),
                                              warmup=args.warmup, rep=args.rep),
                        "loop": do_bench(loop_peer(inp), warmup=args.warmup, rep=args.rep),
                        "gather-bmm": do_bench(gather_bmm_peer(inp), warmup=args.warmup, rep=args.rep),
                    }
                    ours = t["ours"]
                    table.append((name, "  ".join(
                        [f"ours {ours * 1e3:7.1f} us"]
                        + [f"{k} {v * 1e3:7.1f} us ({v / ours:5.1f}x)" for k, v in t.items() if k != "ours"]
                        + [f"max|err| {err:.1e}"])))
                    records.append({"hidden": hidden, "rank": rank, "adapters": n_adapters, "rows": rows,
                                    "us": {k: round(v * 1e3, 2) for k, v in t.items()}, "max_abs_err": err})
    report(f"LoRA shrink+expand, {args.dtype}, {torch.cuda.get_device_name()}", table,
           {"bench": "gpu_lora", "dtype": args.dtype, "cases": records})


def dense_heads_peer(x, W, b, head_offsets, n_labels, multi_label, requests):
    """All heads' logits in one matmul, then each pair's columns gathered (padded) and activated."""
    L = max(requests.max_labels, 1)
    heads = requests.heads.long()
    lab = torch.arange(L, device=x.device)
    valid = lab[None, :] < n_labels[heads][:, None]
    cols = (head_offsets[heads][:, None] + lab[None, :]).clamp(max=W.shape[1] - 1)
    dst = (requests.out_offsets.long()[:, None] + lab[None, :])[valid]
    rows = requests.rows.long()
    multi = multi_label[heads][:, None]
    out = torch.empty(requests.total, device=x.device, dtype=torch.float32)

    def run():
        z = (x @ W + b).float()  # [rows, total_labels]
        zp = z[rows[:, None], cols].masked_fill(~valid, float("-inf"))  # [P, L]
        p = torch.where(multi, torch.sigmoid(zp), torch.softmax(zp, dim=1))
        out[dst] = p[valid]
        return out
    return run


def bench_heads(args: argparse.Namespace, do_bench) -> None:
    from headfleet.kernels import heads, reference
    from headfleet.kernels.layout import pack_head_requests

    dtype = DTYPES[args.dtype]
    n = [args.labels[h % len(args.labels)] for h in range(args.heads)]
    n_t = torch.tensor(n, dtype=torch.int32, device="cuda")
    offsets = (torch.cumsum(n_t, 0) - n_t).to(torch.int32)
    multi = torch.arange(args.heads, device="cuda") % 4 == 3
    table, records = [], []
    for hidden in args.hidden:
        W = (torch.randn(hidden, sum(n), device="cuda") / hidden ** 0.5).to(dtype)
        b = torch.randn(sum(n), device="cuda").to(dtype)
        for rows in args.rows:
            x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
            asked = torch.randint(0, args.heads, (rows, args.heads_per_row)).tolist()
            req = pack_head_requests(asked, n, device="cuda")
            kw = dict(x=x, W=W, b=b, head_offsets=offsets, n_labels=n_t, multi_label=multi, requests=req)
            case = f"h{hidden} heads{args.heads} rows{rows} x{args.heads_per_row}"
            want = reference.batched_heads(**kw)
            err = check(f"heads {case}: ours", heads.batched_heads(**kw), want, args.dtype)
            err_dense = check(f"heads {case}: dense", dense_heads_peer(**kw)(), want, args.dtype)
            t = {
                "ours": do_bench(lambda: heads.batched_heads(**kw, validate=False), warmup=args.warmup, rep=args.rep),
                "reference": do_bench(lambda: reference.batched_heads(**kw, validate=False),
                                      warmup=args.warmup, rep=args.rep),
                "dense": do_bench(dense_heads_peer(**kw), warmup=args.warmup, rep=args.rep),
            }
            ours = t["ours"]
            name = f"h{hidden} heads{args.heads} rows{rows} x{args.heads_per_row}"
            table.append((name, "  ".join(
                [f"ours {ours * 1e3:7.1f} us"]
                + [f"{k} {v * 1e3:7.1f} us ({v / ours:5.1f}x)" for k, v in t.items() if k != "ours"]
                + [f"max|err| {err:.1e} (dense {err_dense:.1e})"])))
            records.append({"hidden": hidden, "rows": rows, "heads": args.heads, "per_row": args.heads_per_row,
                            "us": {k: round(v * 1e3, 2) for k, v in t.items()}, "max_abs_err": err})
    report(f"batched heads, {args.dtype}, {torch.cuda.get_device_name()}", table,
           {"bench": "gpu_heads", "dtype": args.dtype, "cases": records})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin("Triton kernels against torch peers")
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
              "The CPU path is the torch reference (tests/kernels check the kernels under TRITON_INTERPRET=1).",
              file=sys.stderr)
        return 2
    try:
        from triton.testing import do_bench
    except ImportError:
        print("bench/gpu_kernels.py needs triton (pip install 'triton>=3'), which did not import.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if not args.skip_lora:
        bench_lora(args, do_bench)
    if not args.skip_heads:
        bench_heads(args, do_bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
