"""LoRA injection points in the frozen backbone: every target linear gets a per-row low-rank delta.

    y = base(x)                                              # the frozen linear, shared by all rows
    y[i] += scales[s] * (x[i] @ A[s, :, :r_s]) @ B[s, :r_s, :]   for each token i of a row with slot s != -1

Layers see only stacked tensors ``A [max_slots, in, max_rank]``, ``B [max_slots, max_rank, out]``
(one pair per target linear) and per-token slot indices; which adapter sits in which slot is the
adapter manager's business (``headfleet.heads.adapters``). The slots of one forward are set for
the calling thread only (``SlotBank.rows``), so two forwards in two threads never see each
other's slots. Padding tokens get slot -1: their values are masked out by attention and pooling,
so computing their delta would be wasted work.

Training uses the same injection points with one trainable adapter applied to every row
(``SlotBank.training``); the frozen weights never receive gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator, Sequence

import torch
from torch import nn

from headfleet.embedder.lora_names import canonical_module_name, read_by_embedding, target_name
from headfleet.errors import ValidationError
from headfleet.kernels import group_rows_by_slot, lora_shrink_expand, use_triton
from headfleet.kernels.dispatch import TORCH, record
from headfleet.kernels.lora_bmm import lora_bmm

DEFAULT_TARGETS = ("query", "value")

@dataclasses.dataclass
class _Rows:
    """The Triton path: tokens as rows."""

    token_slots: torch.Tensor  # [batch * seq] int64, -1 = no adapter (and every padding token)
    groups: object | None  # RowGroups, built once per forward


@dataclasses.dataclass
class _Seqs:
    """The CPU path (``kernels.lora_bmm``): sequences as rows, one adapter gathered per sequence."""

    rows: torch.Tensor | None  # [k] sequences with an adapter; None = all of them
    slots: torch.Tensor  # [k]
    scales: torch.Tensor  # [k]
    rank: int  # widest rank among them


@dataclasses.dataclass
class TrainableAdapter:
    """One adapter under training, applied to every row: module name -> (A [in, r], B [r, out])."""

    A: dict[str, nn.Parameter]
    B: dict[str, nn.Parameter]
    scale: float
    dropout: float = 0.0

    def parameters(self) -> list[nn.Parameter]:
        return [*self.A.values(), *self.B.values()]


class SlotBank:
    """Stacked adapter weights for every target linear, plus the per-thread slots of the current forward."""

    def __init__(self, max_slots: int, max_rank: int, device: str | torch.device):
        if max_slots < 1 or max_rank < 1:
            raise ValidationError("LoRA needs at least one device slot and a max rank >= 1")
        self.max_slots = int(max_slots)
        self.max_rank = int(max_rank)
        self.device = torch.device(device)
        self.layers: dict[str, "MultiLoRALinear"] = {}  # canonical module name -> layer
        self.ranks = torch.zeros(self.max_slots, dtype=torch.int32, device=self.device)
        self.scales = torch.zeros(self.max_slots, dtype=torch.float32, device=self.device)
        self._ranks_host = [0] * self.max_slots  # the same, on the host: a forward plans without a device sync
        self._scales_host = [0.0] * self.max_slots
        self.generation = [0] * self.max_slots  # bumped by every write / clear of a slot (copies of it go stale)
        self._local = threading.local()

    # -- what a layer asks during a forward ----------------------------------------------------
    def current(self) -> _Rows | _Seqs | TrainableAdapter | None:
        return getattr(self._local, "ctx", None)

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Set the adapter slot of every row ([batch] int on the host, -1 = none) for this thread's
        next forward. On a GPU (or under the Triton interpreter) the fused Triton kernel serves
        token rows; on a CPU, ``kernels.lora_bmm`` serves whole sequences."""
        host = slots.tolist()
        with_adapter = [i for i, s in enumerate(host) if s >= 0 and self._ranks_host[s] > 0]
        if not with_adapter:
            yield  # no adapter rows: the plain forward, bit for bit
            return
        if use_triton(mask):
            token_slots = torch.where(mask.bool(), slots.to(mask.device, torch.int64)[:, None], -1).reshape(-1)
            self._local.ctx = _Rows(token_slots, group_rows_by_slot(token_slots, self.max_slots))
        else:
            chosen = [host[i] for i in with_adapter]
            rows = None if len(with_adapter) == len(host) else torch.tensor(with_adapter, device=self.device)
            self._local.ctx = _Seqs(rows, torch.tensor(chosen, device=self.device),
                                    torch.tensor([self._scales_host[s] for s in chosen], device=self.device),
                                    max(self._ranks_host[s] for s in chosen))
        try:
            yield
        finally:
            self._local.ctx = None

    @contextlib.contextmanager
    def training(self, adapter: TrainableAdapter) -> Iterator[None]:
        self._local.ctx = adapter
        try:
            yield
        finally:
            self._local.ctx = None

    # -- slots ----------------------------------------------------------------------------------
    def write(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, scale: float) -> None:
        """Copy an adapter into ``slot``: ``weights[name] = (A [in, r], B [r, out])`` for every target
        it adapts (a target it leaves out gets a zero delta). The caller makes sure no forward in
        flight uses ``slot``."""
        if not 0 <= slot < self.max_slots:
            raise ValidationError(f"slot {slot} is outside 0..{self.max_slots - 1}")
        if rank > self.max_rank:
            raise ValidationError(f"adapter rank {rank} exceeds the bank's max rank {self.max_rank} "
                                  "(HEADFLEET_LORA_MAX_RANK)")
        unknown = set(weights) - set(self.layers)
        if unknown:
            raise ValidationError(f"adapter targets modules the backbone does not adapt: {sorted(unknown)[:3]}")
        with torch.no_grad():
            self.ranks[slot] = 0  # a forward that raced us would see rank 0 (no delta), never half an adapter
            self._ranks_host[slot] = 0
            for name, layer in self.layers.items():
                layer.A[slot].zero_()
                layer.B[slot].zero_()
                if name in weights:
                    a, b = weights[name]
                    layer.A[slot, :, :rank].copy_(a)
                    layer.B[slot, :rank, :].copy_(b)
            self.scales[slot] = float(scale)
            self.ranks[slot] = int(rank)
            self._scales_host[slot], self._ranks_host[slot] = float(scale), int(rank)
            self.generation[slot] += 1

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            self.ranks[slot] = 0
            self.scales[slot] = 0.0
            self._ranks_host[slot], self._scales_host[slot] = 0, 0.0
            self.generation[slot] += 1

    @property
    def nbytes(self) -> int:
        return sum(layer.A.nbytes + layer.B.nbytes for layer in self.layers.values())


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus the multi-LoRA delta of whatever slots the current forward set."""

    def __init__(self, base: nn.Linear, bank: SlotBank, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.bank = bank
        dtype = base.weight.dtype
        self.register_buffer("A", torch.zeros(bank.max_slots, base.in_features, bank.max_rank, dtype=dtype,
                                              device=bank.device), persistent=False)
        self.register_buffer("B", torch.zeros(bank.max_slots, bank.max_rank, base.out_features, dtype=dtype,
                                              device=bank.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.bank.current()
        if ctx is None:
            return y
        if isinstance(ctx, TrainableAdapter):
            h = nn.functional.dropout(x, ctx.dropout, self.training) if ctx.dropout else x
            return y + (h @ ctx.A[self.name] @ ctx.B[self.name]) * ctx.scale
        # y: [batch, seq, out] fresh from the linear, so updating it in place is safe
        if isinstance(ctx, _Seqs):
            record("lora", TORCH)
            return lora_bmm(y, x, self.A, self.B, ctx.rows, ctx.slots, ctx.scales, ctx.rank)
        lora_shrink_expand(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.A, self.B, ctx.token_slots,
                           self.bank.ranks, self.bank.scales, groups=ctx.groups, validate=False)
        return y


def inject(model: nn.Module, bank: SlotBank, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` whose last name part is in ``targets`` and whose output the
    embedding reads (not the pooler's); returns the canonical names."""
    found = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                full = canonical_module_name(f"{name}.{child_name}" if name else child_name)
                if not read_by_embedding(full):
                    continue
                layer = MultiLoRALinear(child, bank, full)
                setattr(module, child_name, layer)
                bank.layers[full] = layer
                found.append(full)
    if not found:
        raise ValidationError(f"the backbone has no linear layers named {list(targets)} to adapt")
    return found


class ModuleShapes(dict):
    """Canonical name -> (in, out) of every linear layer of a backbone, for checking an imported
    adapter; ``adapted`` names the layers that carry an injection point (model order, empty before
    :func:`inject`), ``unread`` the layers whose output the embedding never reads (the pooler)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], adapted: Sequence[str] = (),
                 unread: Sequence[str] = ()):
        super().__init__(shapes)
        self.adapted: tuple[str, ...] = tuple(adapted)
        self.unread: frozenset[str] = frozenset(unread)

    @property
    def adapted_targets(self) -> list[str]:
        """The short names (``query``, ``value``, ...) of the injection points, as in
        ``HEADFLEET_LORA_TARGETS``."""
        return list(dict.fromkeys(target_name(name) for name in self.adapted))


def module_shapes(model: nn.Module) -> ModuleShapes:
    """Every linear layer's (in, out), which of them are injection points, which are never read."""
    shapes: dict[str, tuple[int, int]] = {}
    adapted: list[str] = []
    wrapped = set()  # the frozen linears inside injection points: listed once, under the point's name
    for name, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            full = canonical_module_name(name)
            shapes[full] = (module.base.in_features, module.base.out_features)
            adapted.append(full)
            wrapped.add(id(module.base))
        elif isinstance(module, nn.Linear) and id(module) not in wrapped:
            shapes[canonical_module_name(name)] = (module.in_features, module.out_features)
    return ModuleShapes(shapes, adapted, [n for n in shapes if not read_by_embedding(n)])
