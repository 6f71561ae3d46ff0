"""Training one LoRA adapter and a linear head on the frozen backbone.

    backbone frozen; adapter (A [in, r], B [r, out] per target; B = 0 at start) injected through
    the same layers that serve; pooled, normalised embedding -> linear head -> softmax / sigmoids
    AdamW, linear warm-up then linear decay; an evaluation on the holdout after every epoch;
    the best state (holdout accuracy, then loss) is kept; stop after ``patience`` epochs without
    improvement.

The head starts from ``head_init`` (the caller's frozen-embedding head) and the adapter starts as
a zero delta, so epoch 0 *is* the frozen head: the kept state is never worse on the holdout than
what a frozen head gives. The holdout rows are the caller's too (the engine takes them from
``heads.split``; this package cannot import heads).
Knows nothing of tenants or registries; returns plain arrays.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from headfleet.embedder.lora import TrainableAdapter
from headfleet.embedder.lora_names import lora_scale
from headfleet.errors import ValidationError


@dataclasses.dataclass
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.05
    epochs: int = 5
    batch_size: int = 16
    lr: float = 5e-4  # adapter
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of all steps
    patience: int = 2  # epochs without holdout improvement before stopping
    holdout: float = 0.15  # share the caller holds out (``heads.split``); train_lora takes the rows
    seed: int = 0

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


@dataclasses.dataclass
class LoraTrained:
    A: dict[str, np.ndarray]  # canonical module name -> [in, r]
    B: dict[str, np.ndarray]  # canonical module name -> [r, out]
    W: np.ndarray  # head [L, d]
    b: np.ndarray  # head [L]
    metrics: dict


def train_lora(embedder, texts: Sequence[str], y: np.ndarray, *, multi_label: bool, head_init: tuple[np.ndarray, np.ndarray],
               holdout_idx: np.ndarray, config: LoraTrainConfig | None = None,
               progress: Callable[[int, int], None] | None = None) -> LoraTrained:
    """Train an adapter and a head on ``texts``; returns the best epoch's weights and the metrics.

    ``y``: [n] class indices (single-label) or [n, L] 0/1 (multi-label). ``head_init``: (W [L, d], b [L]).
    ``holdout_idx``: [k] int row indices kept out for early stopping and the accuracy figures; the
    caller chooses them (the engine uses ``heads.split.per_class_holdout``), every other row trains.
    ``progress(step, total_steps)`` after every optimiser step.
    Raises ``ValidationError`` when the embedder has no LoRA bank or ``config.rank`` exceeds its max rank.
    """
    cfg = config or LoraTrainConfig()
    bank = embedder.lora
    if bank is None:
        raise ValidationError("enable LoRA on the embedder before training an adapter")
    if cfg.rank > bank.max_rank:
        raise ValidationError(f"rank {cfg.rank} exceeds the served max rank {bank.max_rank} (HEADFLEET_LORA_MAX_RANK)")
    n = len(texts)
    rng = np.random.default_rng(cfg.seed)
    holdout_idx = np.asarray(holdout_idx, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(n), holdout_idx)
    ids = embedder.tokenize(list(texts)).ids

    g = torch.Generator().manual_seed(cfg.seed)
    A, B = {}, {}
    for name, layer in bank.layers.items():
        fan_in, fan_out = layer.base.in_features, layer.base.out_features
        bound = 1.0 / math.sqrt(fan_in)
        A[name] = nn.Parameter(torch.empty(fan_in, cfg.rank).uniform_(-bound, bound, generator=g).to(embedder.device))
        B[name] = nn.Parameter(torch.zeros(cfg.rank, fan_out, device=embedder.device))
    adapter = TrainableAdapter(A, B, cfg.scale, cfg.dropout)
    W0, b0 = head_init
    head = nn.Linear(W0.shape[1], W0.shape[0]).to(embedder.device)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(W0, np.float32)))
        head.bias.copy_(torch.from_numpy(np.asarray(b0, np.float32)))
    target = torch.from_numpy(np.asarray(y, np.float32 if multi_label else np.int64))
    loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()

    opt = torch.optim.AdamW([
        {"params": adapter.parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
    ])
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))

    def forward(rows: np.ndarray, train: bool) -> torch.Tensor:
        input_ids, mask = (torch.from_numpy(a).to(embedder.device) for a in embedder.pad([ids[i] for i in rows]))
        ctx = adapter if train else dataclasses.replace(adapter, dropout=0.0)
        with bank.training(ctx):
            pooled = embedder.lora_runner.pooled(input_ids, mask)
        return head(pooled)

    def evaluate() -> tuple[float, float]:
        """(accuracy, loss) on the holdout; multi-label accuracy is per label decision."""
        if len(holdout_idx) == 0:
            return 0.0, 0.0
        order = holdout_idx[np.argsort([len(ids[i]) for i in holdout_idx], kind="stable")]
        logits = []
        with torch.no_grad():
            for s in range(0, len(order), 64):
                logits.append(forward(order[s: s + 64], train=False))
        z = torch.cat(logits)
        t = target[order]
        loss = float(loss_fn(z, t))
        acc = float(((z > 0).float() == t).float().mean()) if multi_label else float((z.argmax(1) == t).float().mean())
        return acc, loss

    def snapshot() -> dict:
        return {"A": {k: v.detach().clone() for k, v in A.items()}, "B": {k: v.detach().clone() for k, v in B.items()},
                "W": head.weight.detach().clone(), "b": head.bias.detach().clone()}

    t0 = time.perf_counter()
    acc0, loss0 = evaluate()
    best, best_key, best_epoch, stale = snapshot(), (acc0, -loss0), 0, 0
    history = [{"epoch": 0, "holdout_accuracy": round(acc0, 4), "holdout_loss": round(loss0, 4)}]
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = rng.permutation(train_idx)
        running = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            rows = perm[s: s + cfg.batch_size]
            with torch.enable_grad():
                loss = loss_fn(forward(rows, train=True), target[rows].to(embedder.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(rows)
            step += 1
            if progress is not None:
                progress(step, total)
        acc, vloss = evaluate()
        history.append({"epoch": epoch, "train_loss": round(running / max(1, len(perm)), 4),
                        "holdout_accuracy": round(acc, 4), "holdout_loss": round(vloss, 4)})
        if (acc, -vloss) > best_key:
            best, best_key, best_epoch, stale = snapshot(), (acc, -vloss), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    return LoraTrained(
        A={k: v.cpu().numpy() for k, v in best["A"].items()},
        B={k: v.cpu().numpy() for k, v in best["B"].items()},
        W=best["W"].cpu().numpy(), b=best["b"].cpu().numpy(),
        metrics={"holdout_size": int(len(holdout_idx)), "train_size": int(len(train_idx)),
                 "frozen_holdout_accuracy": round(acc0, 4), "holdout_accuracy": round(best_key[0], 4),
                 "accuracy": round(best_key[0], 4),  # the name head training uses for holdout accuracy
                 "best_epoch": best_epoch, "epochs_run": len(history) - 1, "history": history,
                 "train_seconds": round(time.perf_counter() - t0, 2), "steps": step},
    )

