"""The CPU serving path of multi-LoRA (one adapter per sequence, gather + bmm) against the reference.

Each sequence's tokens are flattened into rows carrying the sequence's slot and given to
``reference.lora_shrink_expand``; ``lora_bmm`` must give the same y, leave sequences without an
adapter untouched bit for bit, and honour mixed ranks (zero padding past each slot's rank).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import ADAPTER_COUNTS, RANKS, lora_case  # noqa: E402

from headfleet.kernels import reference  # noqa: E402
from headfleet.kernels.lora_bmm import lora_bmm  # noqa: E402


@pytest.mark.parametrize("hidden_in,hidden_out", [(1, 1), (37, 127), (384, 384), (384, 1536)])
@pytest.mark.parametrize("n_adapters", ADAPTER_COUNTS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch,seq", [(1, 1), (7, 13), (32, 24)])
def test_sequence_bmm_matches_the_token_reference(batch, seq, rank, n_adapters, hidden_in, hidden_out):
    ranks = [rank if s % 3 else max(1, rank // 2) for s in range(n_adapters)]  # mixed ranks in one stack
    case = lora_case(batch * seq, hidden_in, hidden_out, ranks, torch.float32)
    A, B, scales = case["A"].cpu(), case["B"].cpu(), case["scales"].cpu()
    seq_slots = torch.randint(-1, n_adapters, (batch,))
    seq_slots[0] = n_adapters - 1  # at least one adapter row
    x = case["x"].cpu().view(batch, seq, hidden_in)
    y = case["y"].cpu().view(batch, seq, hidden_out)
    expected = reference.lora_shrink_expand(y.clone().view(-1, hidden_out), x.reshape(-1, hidden_in), A, B,
                                            seq_slots.repeat_interleave(seq).to(torch.int32), case["ranks"].cpu(),
                                            scales).view(batch, seq, hidden_out)
    rows = torch.nonzero(seq_slots >= 0).flatten()
    slots = seq_slots[rows]
    got = lora_bmm(y.clone(), x, A, B, None if len(rows) == batch else rows, slots, scales[slots],
                   max(ranks[s] for s in slots.tolist()))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    untouched = seq_slots < 0
    assert torch.equal(got[untouched], y[untouched])
