"""Plain-torch references for every kernel, with the kernels' exact API.

Tests and benches import these (never a copy), and the product runs them wherever Triton does
not (``headfleet.kernels.dispatch``). They accumulate in fp32 and round once, as the kernels do.
"""

from __future__ import annotations

import torch

from .checks import check_heads_args, check_lora_args
from .layout import HeadRequests, RowGroups


def lora_shrink_expand(
    y: torch.Tensor,  # y: [rows, hidden_out], updated in place
    x: torch.Tensor,  # x: [rows, hidden_in]
    A: torch.Tensor,  # A: [max_slots, hidden_in, max_rank]
    B: torch.Tensor,  # B: [max_slots, max_rank, hidden_out]
    slots: torch.Tensor,  # slots: [rows] int, -1 = no adapter
    ranks: torch.Tensor,  # ranks: [max_slots] int, 0 <= ranks[s] <= max_rank
    scales: torch.Tensor,  # scales: [max_slots] float32 (PEFT: alpha / r, or alpha / sqrt(r))
    *,
    groups: RowGroups | None = None,  # accepted for API parity with the kernel; unused here
    validate: bool | None = None,  # value checks; None = on CPU only (a host sync on CUDA)
) -> torch.Tensor:
    """Multi-LoRA delta, added to ``y`` in place; returns ``y``.

        for i in range(rows):
            s = slots[i]
            if s == -1: continue                       # row untouched, bit for bit
            r = ranks[s]
            t = x[i] @ A[s, :, :r]                     # shrink: [hidden_in] -> [r]     (fp32)
            y[i] = cast(y[i] + scales[s] * (t @ B[s, :r, :]))   # expand: [r] -> [hidden_out]

    Columns of A and rows of B past ``ranks[s]`` are ignored, so adapters of several ranks share
    one stacked tensor (zero padding is conventional, not required). A slot of rank 0 adds nothing.
    In place is safe because each row is read once (x) and written once (y); ``y`` may not alias ``x``.
    """
    check_lora_args(y, x, A, B, slots, ranks, scales, groups, validate)
    if x.shape[0] == 0:
        return y
    order = torch.argsort(slots, stable=True)
    present, counts = torch.unique_consecutive(slots[order], return_counts=True)
    ranks_h, scales_h = ranks.tolist(), scales.tolist()
    start = 0
    for s, c in zip(present.tolist(), counts.tolist()):
        rows = order[start: start + c]
        start += c
        if s < 0 or ranks_h[s] == 0:
            continue
        r = ranks_h[s]
        t = x[rows].float() @ A[s, :, :r].float()  # [c, r]
        delta = (t @ B[s, :r, :].float()) * scales_h[s]  # [c, hidden_out]
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


def batched_heads(
    x: torch.Tensor,  # x: [rows, hidden]
    W: torch.Tensor,  # W: [hidden, total_labels], head h in columns head_offsets[h] : + n_labels[h]
    b: torch.Tensor,  # b: [total_labels]
    head_offsets: torch.Tensor,  # head_offsets: [n_heads] int
    n_labels: torch.Tensor,  # n_labels: [n_heads] int, >= 1
    multi_label: torch.Tensor,  # multi_label: [n_heads] bool, True = independent sigmoids
    requests: HeadRequests,  # which heads each row asked for (pack_head_requests)
    *,
    out: torch.Tensor | None = None,  # out: [requests.total] float32, written and returned
    validate: bool | None = None,  # value checks; None = on CPU only (a host sync on CUDA)
) -> torch.Tensor:
    """Logits and activation of the heads each row asked for, packed CSR-like; returns ``out``.

        for each pair q = (i, h) of the request, in request order:
            o, n = head_offsets[h], n_labels[h]
            z = x[i] @ W[:, o : o + n] + b[o : o + n]           # fp32
            p = sigmoid(z) if multi_label[h] else softmax(z)
            out[requests.out_ptr[q] : requests.out_ptr[q] + n] = p

    A binary classifier is a 2-label softmax head (or a 1-label sigmoid head). Output is float32
    whatever x's dtype. ``requests.unpack(out)`` splits it per row, per head asked.
    """
    check_heads_args(x, W, b, head_offsets, n_labels, multi_label, requests, out, validate)
    if out is None:
        out = torch.empty(requests.total, dtype=torch.float32, device=x.device)
    offs_h, n_h, multi_h = head_offsets.tolist(), n_labels.tolist(), multi_label.tolist()
    for h, first, count in zip(requests.seg_heads.tolist(), requests.seg_starts.tolist(),
                               requests.seg_counts.tolist()):
        rows = requests.rows[first: first + count].long()
        dst = requests.out_offsets[first: first + count].long()
        o, n = offs_h[h], n_h[h]
        z = x[rows].float() @ W[:, o: o + n].float() + b[o: o + n].float()  # [count, n]
        p = torch.sigmoid(z) if multi_h[h] else torch.softmax(z, dim=1)
        out[dst[:, None] + torch.arange(n, device=out.device)] = p
    return out
