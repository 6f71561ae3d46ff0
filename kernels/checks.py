"""Argument checks shared by each kernel launcher and its reference, so both paths reject the same
inputs with the same message. Shape, dtype, device and contiguity checks read only metadata;
value checks (slot and rank ranges) read the tensors, which is a host sync on CUDA, so they run
when ``validate`` is True, or by default (None) only for CPU tensors.
"""

from __future__ import annotations

import torch

from .layout import HeadRequests, RowGroups

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INTS = (torch.int32, torch.int64)


def _need(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(msg)


def _shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    _need(tuple(t.shape) == shape, f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    _need(t.dtype in allowed, f"{name} must be one of {[str(d) for d in allowed]}, got {t.dtype}", TypeError)


def _contig(name: str, t: torch.Tensor) -> None:
    _need(t.is_contiguous(), f"{name} must be contiguous (call .contiguous() once, outside the hot path)")


def _same_device(tensors: dict[str, torch.Tensor]) -> None:
    devices = {str(t.device) for t in tensors.values()}
    _need(len(devices) == 1, "all tensors must be on one device, got "
          + ", ".join(f"{k}: {t.device}" for k, t in tensors.items()))


def _validate(validate: bool | None, t: torch.Tensor) -> bool:
    return (t.device.type == "cpu") if validate is None else validate


def check_lora_args(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                    ranks: torch.Tensor, scales: torch.Tensor, groups: RowGroups | None,
                    validate: bool | None) -> None:
    _need(x.dim() == 2, f"x must be 2-D [rows, hidden_in], got shape {list(x.shape)}")
    _need(A.dim() == 3, f"A must be 3-D [max_slots, hidden_in, max_rank], got shape {list(A.shape)}")
    _need(B.dim() == 3, f"B must be 3-D [max_slots, max_rank, hidden_out], got shape {list(B.shape)}")
    rows, k = x.shape
    s, _, r = A.shape
    n = B.shape[2]
    _need(r >= 1, "A's max_rank axis must be >= 1")
    _shape("A", A, (s, k, r))
    _shape("B", B, (s, r, n))
    _shape("y", y, (rows, n))
    _shape("slots", slots, (rows,))
    _shape("ranks", ranks, (s,))
    _shape("scales", scales, (s,))
    _dtype("x", x, FLOATS)
    for name, t in (("y", y), ("A", A), ("B", B)):
        _need(t.dtype == x.dtype, f"{name} must have x's dtype {x.dtype}, got {t.dtype}", TypeError)
    _dtype("slots", slots, INTS)
    _dtype("ranks", ranks, INTS)
    _dtype("scales", scales, (torch.float32,))
    for name, t in (("y", y), ("x", x), ("A", A), ("B", B), ("slots", slots), ("ranks", ranks), ("scales", scales)):
        _contig(name, t)
    _same_device({"y": y, "x": x, "A": A, "B": B, "slots": slots, "ranks": ranks, "scales": scales})
    if groups is not None:
        _need(groups.max_slots == s, f"groups were built for {groups.max_slots} slots, A has {s}")
        _shape("groups.order", groups.order, (rows,))
        _need(groups.order.device == x.device, "groups must be on x's device")
    if _validate(validate, slots) and rows:
        lo, hi = int(slots.min()), int(slots.max())
        _need(lo >= -1 and hi < s, f"slots must lie in [-1, {s}), got values in [{lo}, {hi}]")
    if _validate(validate, ranks) and s:
        lo, hi = int(ranks.min()), int(ranks.max())
        _need(lo >= 0 and hi <= r, f"ranks must lie in [0, {r}] (A's max_rank), got values in [{lo}, {hi}]")


def check_heads_args(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, head_offsets: torch.Tensor,
                     n_labels: torch.Tensor, multi_label: torch.Tensor, requests: HeadRequests,
                     out: torch.Tensor | None, validate: bool | None) -> None:
    _need(x.dim() == 2, f"x must be 2-D [rows, hidden], got shape {list(x.shape)}")
    _need(W.dim() == 2, f"W must be 2-D [hidden, total_labels], got shape {list(W.shape)}")
    rows, d = x.shape
    total_labels = W.shape[1]
    n_heads = head_offsets.shape[0] if head_offsets.dim() == 1 else -1
    _shape("W", W, (d, total_labels))
    _shape("b", b, (total_labels,))
    _need(head_offsets.dim() == 1, f"head_offsets must be 1-D [n_heads], got shape {list(head_offsets.shape)}")
    _shape("n_labels", n_labels, (n_heads,))
    _shape("multi_label", multi_label, (n_heads,))
    _need(requests.n_rows == rows, f"requests were packed for {requests.n_rows} rows, x has {rows}")
    _dtype("x", x, FLOATS)
    for name, t in (("W", W), ("b", b)):
        _need(t.dtype == x.dtype, f"{name} must have x's dtype {x.dtype}, got {t.dtype}", TypeError)
    _dtype("head_offsets", head_offsets, INTS)
    _dtype("n_labels", n_labels, INTS)
    _dtype("multi_label", multi_label, (torch.bool,))
    named = {"x": x, "W": W, "b": b, "head_offsets": head_offsets, "n_labels": n_labels,
             "multi_label": multi_label, "requests.rows": requests.rows}
    if out is not None:
        _shape("out", out, (requests.total,))
        _dtype("out", out, (torch.float32,))
        named["out"] = out
    for name, t in named.items():
        _contig(name, t)
    _same_device(named)
    if _validate(validate, n_labels) and n_heads:
        offs, n = head_offsets.to(torch.int64).cpu(), n_labels.to(torch.int64).cpu()
        bad = (n < 1) | (offs < 0) | (offs + n > total_labels)
        if bool(bad.any()):
            h = int(bad.nonzero()[0, 0])
            raise ValueError(f"head {h} has {int(n[h])} labels at columns [{int(offs[h])}, {int(offs[h] + n[h])}), "
                             f"outside W's [0, {total_labels}) or empty")
        widths = n[torch.from_numpy(requests.asked)].numpy()
        _need(bool((widths == requests.out_ptr[1:] - requests.out_ptr[:-1]).all()),
              "requests were packed with other n_labels than the ones passed here")
