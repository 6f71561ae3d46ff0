"""The frozen backbone forward: tokenise, length-sorted batches, mean-pool, normalise.

Reproduces sentence-transformers' Transformer -> Pooling -> Normalize for the same model
folder. Truncation is never silent: every text reports its token count and whether it was cut.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from headfleet.errors import BackendError
from headfleet.embedder.backbone import PoolingConfig, fingerprint, resolve_model_path, tokenizer_hash


@dataclasses.dataclass
class Embedded:
    vectors: np.ndarray  # [n, dim] float32, L2-normalised when the model normalises
    n_tokens: np.ndarray  # [n] tokens before truncation, special tokens included
    truncated: np.ndarray  # [n] bool: the text was longer than max_length and was cut

    @property
    def truncated_count(self) -> int:
        return int(self.truncated.sum())


@dataclasses.dataclass
class TokenCounts:
    n_tokens: np.ndarray  # [n] before truncation
    n_unk: np.ndarray  # [n] [UNK] tokens
    truncated: np.ndarray  # [n] bool


class Embedder:
    """One frozen encoder. Create with :meth:`load`; thread-safe for concurrent ``embed`` calls."""

    def __init__(self, folder: Path, model, tokenizer, pooling: PoolingConfig, *, max_length: int,
                 batch_size: int, device: str, fingerprint: str, tokenizer_hash: str):
        self.folder = folder
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.fingerprint = fingerprint
        self.tokenizer_hash = tokenizer_hash
        self.dim = int(model.config.hidden_size)
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0
        self._sep_id = tokenizer.token_to_id("[SEP]")
        self._unk_id = tokenizer.token_to_id("[UNK]")
        self.forwards = 0  # backbone forward passes run
        self.texts_embedded = 0

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, max_length: int = 256, batch_size: int = 64,
             device: str | None = None, threads: int | None = None) -> "Embedder":
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own CLI reports progress; no bar per weight file

        folder = resolve_model_path(path)
        if threads:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # a broken folder must say which folder
            raise BackendError(f"could not load the backbone from {folder}: {exc}") from exc
        model.eval().requires_grad_(False).to(device)
        limit = int(getattr(model.config, "max_position_embeddings", 512))
        if not 2 < max_length <= limit:
            raise BackendError(f"max_length {max_length} is outside 3..{limit} for this backbone")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        pooling = PoolingConfig.from_folder(folder)
        return cls(folder, model, tokenizer, pooling, max_length=max_length, batch_size=batch_size,
                   device=device, fingerprint=fingerprint(folder, pooling), tokenizer_hash=tokenizer_hash(folder))

    # -- tokenisation -------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def _truncate(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        return ids[: self.max_length - 1] + [self._sep_id]

    def count_tokens(self, texts: Sequence[str]) -> TokenCounts:
        """Token statistics for training-data validation (share of [UNK], share truncated)."""
        ids = self._encode(texts)
        n = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        unk = np.fromiter((x.count(self._unk_id) for x in ids), dtype=np.int64, count=len(ids))
        return TokenCounts(n_tokens=n, n_unk=unk, truncated=n > self.max_length)

    # -- forward ------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> Embedded:
        """Embed texts; batches are cut from the texts sorted by length, so padding is small."""
        import torch

        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return Embedded(out, np.zeros(0, np.int64), np.zeros(0, bool))
        ids = self._encode(texts)
        n_tokens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        ids = [self._truncate(x) for x in ids]
        order = np.argsort([len(x) for x in ids], kind="stable")
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._forward([ids[i] for i in rows])
                if progress is not None:
                    progress(len(rows))
        self.texts_embedded += n
        return Embedded(out, n_tokens, n_tokens > self.max_length)

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        import torch

        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        input_ids = input_ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        hidden = self.model(input_ids=input_ids, attention_mask=mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        self.forwards += 1
        if self.pooling.mode == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.pooling.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()
