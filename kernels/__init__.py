"""Triton kernels and their plain-torch references, one op per file.

    lora.py       fused multi-LoRA shrink + expand      (Triton)
    heads.py      batched heads, logits + activation    (Triton)
    reference.py  the same two ops in plain torch
    layout.py     row grouping and head requests (no Triton)
    checks.py     argument checks shared by each kernel and its reference
    dispatch.py   picks Triton or torch per call and counts which ran

Callers use the names below; they never import Triton themselves.
"""

from .dispatch import batched_heads, last_path, lora_shrink_expand, path_counts, use_triton
from .layout import HeadRequests, RowGroups, group_rows_by_slot, pack_head_requests

__all__ = [
    "HeadRequests", "RowGroups", "batched_heads", "group_rows_by_slot", "last_path", "lora_shrink_expand",
    "pack_head_requests", "path_counts", "use_triton",
]
