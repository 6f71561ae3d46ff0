"""Batched heads, logits and activation fused: for each (row, head) pair a request asked for,
``softmax(x[row] @ W[:, cols(head)] + b[cols(head)])`` (sigmoid for multi-label heads), written
into one packed float32 output.

Pairs arrive sorted by head (``pack_head_requests``), so one program takes up to BLOCK_M rows that
asked for the same head: one [BLOCK_M, hidden] x [hidden, BLOCK_L] tile product, the bias, the
activation over the head's labels, and a scatter of each row's probabilities to its offset.

Not on the serving path: ``heads.fleet.HeadFleet`` scores every head with numpy on the host (its
docstring says why); this kernel is tested and benched, not called by the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_heads_args
from .layout import HeadRequests

MAX_LABELS = 1024  # one head's labels must fit one tile; wider heads: use the reference


@triton.jit
def _batched_heads_kernel(
    x_ptr,  # x: [rows, D]
    w_ptr,  # W: [D, T]
    b_ptr,  # b: [T]
    out_ptr,  # out: [total] float32
    head_offsets_ptr,  # head_offsets: [n_heads] int
    n_labels_ptr,  # n_labels: [n_heads] int
    multi_ptr,  # multi_label: [n_heads] uint8 (bool viewed)
    rows_ptr,  # rows: [P] int32, pairs sorted by head
    out_offsets_ptr,  # out_offsets: [P] int32
    tiles_ptr,  # tiles: [n_tiles, 3] int32 (head, first pair, n pairs)
    D, T,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    FP32_EXACT: tl.constexpr,  # fp32 inputs: IEEE dot
):
    tile = tl.program_id(0)
    head = tl.load(tiles_ptr + tile * 3)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    col0 = tl.load(head_offsets_ptr + head)
    n = tl.load(n_labels_ptr + head)
    multi = tl.load(multi_ptr + head)

    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(rows_ptr + first + offs_m, mask=m_mask, other=0).to(tl.int64)
    dst = tl.load(out_offsets_ptr + first + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    l_mask = offs_l < n
    cols = col0 + offs_l

    # logits: z[BLOCK_M, BLOCK_L] = x[rows, :] @ W[:, col0 : col0 + n] + b[col0 : col0 + n]
    z = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        xb = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        wb = tl.load(w_ptr + offs_d[:, None].to(tl.int64) * T + cols[None, :], mask=d_mask[:, None] & l_mask[None, :],
                     other=0.0)
        if FP32_EXACT:
            z = tl.dot(xb, wb, z, input_precision="ieee")
        else:
            z = tl.dot(xb, wb, z)
    z += tl.load(b_ptr + cols, mask=l_mask, other=0.0).to(tl.float32)[None, :]

    # activation over this head's labels only
    zm = tl.where(l_mask[None, :], z, float("-inf"))
    e = tl.exp(zm - tl.max(zm, axis=1)[:, None])
    soft = e / tl.sum(e, axis=1)[:, None]
    p = tl.where(multi != 0, tl.sigmoid(z), soft)
    tl.store(out_ptr + dst[:, None] + offs_l[None, :], p, mask=m_mask[:, None] & l_mask[None, :])


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
    block_m: int = 16,
) -> torch.Tensor:
    """Probabilities of the heads each row asked for, packed in request order; returns ``out``.

        for each pair q = (i, h) of the request:
            o, n = head_offsets[h], n_labels[h]
            z = x[i] @ W[:, o : o + n] + b[o : o + n]           # fp32 accumulation
            p = sigmoid(z) if multi_label[h] else softmax(z)
            out[requests.out_ptr[q] : requests.out_ptr[q] + n] = p

    Grid: one program per tile of <= block_m pairs asking for the same head (``requests.tiles``,
    computed on the host from the request, so no device sync). Heads wider than MAX_LABELS are
    refused; the widest head asked sets the label tile (``requests.max_labels``).
    """
    check_heads_args(x, W, b, head_offsets, n_labels, multi_label, requests, out, validate)
    if requests.max_labels > MAX_LABELS:
        raise ValueError(f"a head asked for has {requests.max_labels} labels; the kernel takes at most "
                         f"{MAX_LABELS} (use headfleet.kernels.reference.batched_heads)")
    if out is None:
        out = torch.empty(requests.total, dtype=torch.float32, device=x.device)
    if requests.n_pairs == 0:
        return out
    rows, d = x.shape
    tiles = torch.from_numpy(requests.tiles(block_m)).to(x.device, non_blocking=True)
    block_d = 64 if x.is_cuda else 128  # the interpreter prefers few, large tiles
    _batched_heads_kernel[(tiles.shape[0],)](
        x, W, b, out, head_offsets, n_labels, multi_label.view(torch.uint8),
        requests.rows, requests.out_offsets, tiles,
        d, W.shape[1],
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_L=max(16, triton.next_power_of_2(requests.max_labels)),
        FP32_EXACT=x.dtype == torch.float32,
    )
    return out
