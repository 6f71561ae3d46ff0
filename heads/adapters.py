"""LoRA adapters: Hugging Face PEFT's file format, and the manager that puts them in device slots.

An adapter on disk is PEFT's pair, so one trained here loads in PEFT and one trained with PEFT
loads here:
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", ...}
    adapter_model.safetensors  "<prefix>.encoder.layer.N.attention.self.query.lora_A.weight" [r, in]
                               "<prefix>.encoder.layer.N.attention.self.query.lora_B.weight" [out, r]
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

The manager (vLLM's model manager, for an encoder): adapters live on disk (the registry), in
host memory (an LRU of at most ``max_loaded``) and in device slots (an LRU of the bank's
``max_slots``). ``acquire`` hot-loads what a batch needs and pins it until ``release``, so an
adapter is never evicted from under a forward in flight; when every slot is pinned by batches
in flight, ``acquire`` raises :class:`NoAdapterSlotError` rather than waiting or guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from headfleet.errors import AdapterImportError, NoAdapterSlotError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoraAdapter:
    """One adapter's weights, keyed by canonical module name (``encoder.layer.N....query``)."""

    rank: int
    alpha: float
    use_rslora: bool
    targets: list[str]  # short names as in PEFT's target_modules, e.g. ["query", "value"]
    A: dict[str, np.ndarray]  # name -> [in, r] float32 (PEFT stores lora_A.weight as [r, in])
    B: dict[str, np.ndarray]  # name -> [r, out] float32 (PEFT stores lora_B.weight as [out, r])
    base_model: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.A.values()) + sum(b.nbytes for b in self.B.values())

    def torch_weights(self, device) -> dict:
        import torch

        return {n: (torch.from_numpy(self.A[n]).to(device), torch.from_numpy(self.B[n]).to(device)) for n in self.A}

    # -- PEFT format ----------------------------------------------------------------------------
    def peft_config(self) -> dict:
        return {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": self.rank, "lora_alpha": self.alpha,
                "use_rslora": self.use_rslora, "target_modules": sorted(self.targets), "lora_dropout": 0.0,
                "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
                "base_model_name_or_path": self.base_model, "inference_mode": True}

    def to_files(self) -> dict[str, bytes]:
        """``{adapter_config.json, adapter_model.safetensors}`` as bytes, in PEFT's layout."""
        from safetensors.numpy import save

        tensors = {}
        for name in sorted(self.A):
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(self.A[name].T)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(self.B[name].T)
        return {CONFIG_FILE: (json.dumps(self.peft_config(), indent=2) + "\n").encode(),
                WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}

    @classmethod
    def from_folder(cls, folder: Path | str, *, shapes: dict[str, tuple[int, int]] | None = None,
                    base_names: Iterable[str] = ()) -> "LoraAdapter":
        """Read a PEFT LoRA folder. With ``shapes`` (canonical module -> (in, out) of the backbone)
        and ``base_names`` (names the backbone goes by), refuse an adapter made for another model."""
        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not cfg_path.exists():
            raise AdapterImportError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
        if not w_path.exists():
            raise AdapterImportError(f"{folder} has no {WEIGHTS_FILE} (adapter_model.bin pickles are not loaded; "
                                     "re-save the adapter with safe_serialization=True)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterImportError(f"{cfg_path} is not valid JSON: {exc}") from None
        return cls.from_parts(cfg, w_path.read_bytes(), shapes=shapes, base_names=base_names, where=str(folder))

    @classmethod
    def from_parts(cls, cfg: dict, weights: bytes, *, shapes: dict[str, tuple[int, int]] | None = None,
                   base_names: Iterable[str] = (), where: str = "adapter") -> "LoraAdapter":
        from safetensors.numpy import load

        from headfleet.embedder.lora import canonical_module_name

        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise AdapterImportError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
        for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
            if bool(cfg.get(key) or False) != ok:
                raise AdapterImportError(f"{where}: {key}={cfg.get(key)} is not supported (plain LoRA only)")
        if cfg.get("bias", "none") != "none":
            raise AdapterImportError(f"{where}: bias={cfg.get('bias')!r} trains backbone biases; only bias='none' "
                                     "adapters leave the shared backbone untouched")
        if cfg.get("modules_to_save"):
            raise AdapterImportError(f"{where}: modules_to_save={cfg['modules_to_save']} replaces whole backbone "
                                     "modules; headfleet serves low-rank deltas only")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise AdapterImportError(f"{where}: per-module rank_pattern/alpha_pattern is not supported")
        base = cfg.get("base_model_name_or_path")
        names = {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in base_names if n}
        if base and names and base.rstrip("/").rsplit("/", 1)[-1].lower() not in names:
            raise AdapterImportError(f"{where} was trained on base model {base!r}, but this backbone is "
                                     f"{sorted(names)[0]!r}: an adapter only works on the weights it was trained on")
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        try:
            tensors = load(weights)
        except Exception as exc:
            raise AdapterImportError(f"{where}: the safetensors file cannot be read: {exc}") from None
        A: dict[str, np.ndarray] = {}
        B: dict[str, np.ndarray] = {}
        for key, value in tensors.items():
            stem, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight") and not kind.startswith(("A.", "B.")):
                raise AdapterImportError(f"{where}: tensor {key!r} is not a LoRA A/B weight; refusing an adapter "
                                         "that changes more than low-rank deltas")
            name = canonical_module_name(stem)
            arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32).T)
            (A if kind.startswith("A") else B)[name] = arr
        if not A or set(A) != set(B):
            raise AdapterImportError(f"{where}: lora_A and lora_B weights do not pair up")
        for name in A:
            a, b = A[name], B[name]
            if a.shape[1] != r or b.shape[0] != r:
                raise AdapterImportError(f"{where}: {name} has rank {a.shape[1]}/{b.shape[0]}, config says r={r}")
            if shapes is not None:
                if name not in shapes:
                    raise AdapterImportError(f"{where}: the backbone has no layer {name!r}; this adapter was made "
                                             "for another architecture")
                if (a.shape[0], b.shape[1]) != shapes[name]:
                    raise AdapterImportError(f"{where}: {name} is {a.shape[0]}->{b.shape[1]} in the adapter but "
                                             f"{shapes[name][0]}->{shapes[name][1]} in this backbone: another base model")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise AdapterImportError(f"{where}: {name} holds non-finite values")
        targets = sorted({n.rsplit(".", 1)[-1] for n in A})
        return cls(rank=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)), targets=targets, A=A, B=B,
                   base_model=base)


@dataclasses.dataclass
class _Loaded:
    adapter: LoraAdapter
    slot: int = -1
    pins: int = 0  # batches in flight using the slot, plus explicit pins


class AdapterManager:
    """id -> device slot, with host and device LRUs, pinning, load metrics.

    One manager per SlotBank (``manager_for(bank)``), whoever drives the backbone. An id names
    one adapter's content (the engine uses ``<tenant>/<name>@<version>#<sha256 prefix>``), so the
    same id always means the same weights. ``load(id) -> LoraAdapter`` reads an adapter from disk
    (the registry); it is given per :meth:`acquire`, as only the caller knows where its registry is.
    Thread-safe; slot writes happen under the lock, and only into a slot no batch in flight holds.
    """

    def __init__(self, bank, load: Callable[[str], LoraAdapter] | None = None, *, max_loaded: int = 1024,
                 on_load: Callable[[float], None] | None = None):
        self.bank = bank
        self._load = load
        self.max_loaded = max(int(max_loaded), bank.max_slots)
        self.load_hooks: list[Callable[[float], None]] = [on_load] if on_load else []  # seconds per cold load
        self._host: OrderedDict[str, _Loaded] = OrderedDict()  # LRU: least recently used first
        self._slots: list[str | None] = [None] * bank.max_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(bank.max_slots))
        self._explicit: dict[str, int] = {}
        self._lock = threading.Lock()
        self.counts = {"disk_loads": 0, "slot_loads": 0, "slot_hits": 0, "host_evictions": 0, "slot_evictions": 0}
        self.load_ms: list[float] = []  # disk -> host -> slot times of recent cold loads (bounded)

    @property
    def max_slots(self) -> int:
        return self.bank.max_slots

    def acquire(self, ids: Sequence[str], load: Callable[[str], LoraAdapter] | None = None) -> dict[str, int]:
        """Slots for the distinct ``ids`` of one batch, pinned until :meth:`release`. All or nothing."""
        ids = list(dict.fromkeys(ids))
        if len(ids) > self.max_slots:
            raise NoAdapterSlotError(f"{len(ids)} adapters in one batch but only {self.max_slots} device slots "
                                     "(HEADFLEET_LORA_SLOTS); split the batch")
        got: dict[str, int] = {}
        try:
            for aid in ids:
                got[aid] = self._acquire_one(aid, load or self._load)
        except BaseException:
            self.release(list(got))
            raise
        return got

    def release(self, ids: Iterable[str]) -> None:
        with self._lock:
            for aid in dict.fromkeys(ids):
                entry = self._host.get(aid)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1

    def pin(self, aid: str, load: Callable[[str], LoraAdapter] | None = None) -> int:
        """Keep ``aid`` in a device slot until :meth:`unpin` (a tenant that must never cold-load)."""
        slot = self.acquire([aid], load)[aid]
        with self._lock:
            self._explicit[aid] = self._explicit.get(aid, 0) + 1
        return slot

    def unpin(self, aid: str) -> None:
        with self._lock:
            if self._explicit.get(aid):
                self._explicit[aid] -= 1
                if not self._explicit[aid]:
                    del self._explicit[aid]
        self.release([aid])

    def forget(self, aid: str) -> None:
        """Drop ``aid`` from host memory and its slot (a deleted or retrained classifier); a batch in
        flight keeps its slot until it releases it."""
        with self._lock:
            entry = self._host.get(aid)
            if entry is None or entry.pins:
                return
            self._drop(aid, entry)

    def forget_matching(self, pred: Callable[[str], bool]) -> None:
        """:meth:`forget` every adapter whose id satisfies ``pred``."""
        with self._lock:
            ids = [aid for aid in self._host if pred(aid)]
        for aid in ids:
            self.forget(aid)

    def slot_of(self, aid: str) -> int:
        with self._lock:
            entry = self._host.get(aid)
            return -1 if entry is None else entry.slot

    def snapshot(self) -> dict:
        with self._lock:
            return {"slots": self.max_slots, "slots_used": sum(s is not None for s in self._slots),
                    "loaded": len(self._host), "max_loaded": self.max_loaded,
                    "pinned": sum(e.pins > 0 for e in self._host.values()), **self.counts}

    # -- internals --------------------------------------------------------------------------------
    def _acquire_one(self, aid: str, load: Callable[[str], LoraAdapter] | None) -> int:
        with self._lock:
            entry = self._host.get(aid)
            if entry is not None and entry.slot >= 0:
                entry.pins += 1
                self._host.move_to_end(aid)
                self._slot_lru.move_to_end(entry.slot)
                self.counts["slot_hits"] += 1
                return entry.slot
        t0 = time.perf_counter()
        if entry is None and load is None:
            raise KeyError(f"adapter {aid!r} is not loaded and no loader was given")
        adapter = entry.adapter if entry is not None else load(aid)  # disk read outside the lock
        with self._lock:
            entry = self._host.get(aid)
            if entry is None:
                entry = self._host[aid] = _Loaded(adapter)
                self.counts["disk_loads"] += 1
            self._host.move_to_end(aid)
            if entry.slot < 0:
                slot = self._free_slot()
                self.bank.write(slot, adapter.torch_weights(self.bank.device), adapter.rank, adapter.scale)
                self._slots[slot] = aid
                entry.slot = slot
                self.counts["slot_loads"] += 1
                ms = (time.perf_counter() - t0) * 1e3
                self.load_ms.append(ms)
                del self.load_ms[:-1024]
                for hook in self.load_hooks:
                    hook(ms / 1e3)
            else:
                self.counts["slot_hits"] += 1
            entry.pins += 1
            self._slot_lru.move_to_end(entry.slot)
            self._evict_host()  # after pinning: the adapter just loaded is never the one evicted
            return entry.slot

    def _free_slot(self) -> int:
        for slot in self._slot_lru:  # least recently used first
            owner = self._slots[slot]
            if owner is None:
                return slot
            entry = self._host[owner]
            if entry.pins == 0:
                entry.slot = -1
                self._slots[slot] = None
                self.bank.clear(slot)
                self.counts["slot_evictions"] += 1
                return slot
        raise NoAdapterSlotError(f"all {self.max_slots} LoRA device slots are held by batches in flight or pinned; "
                                 "retry shortly, or raise HEADFLEET_LORA_SLOTS")

    def _evict_host(self) -> None:
        while len(self._host) > self.max_loaded:
            for aid, entry in self._host.items():
                if entry.pins == 0 and entry.slot < 0:
                    self._drop(aid, entry)
                    self.counts["host_evictions"] += 1
                    break
            else:  # everything left is in a slot: host memory is bounded by slots, not by max_loaded
                return

    def _drop(self, aid: str, entry: _Loaded) -> None:
        if entry.slot >= 0:
            self._slots[entry.slot] = None
            self.bank.clear(entry.slot)
        del self._host[aid]


_managers_lock = threading.Lock()


def manager_for(bank, *, max_loaded: int = 1024) -> AdapterManager:
    """The one manager of ``bank`` (created at the first call)."""
    with _managers_lock:
        manager = getattr(bank, "manager", None)
        if manager is None:
            manager = bank.manager = AdapterManager(bank, max_loaded=max_loaded)
        return manager


__all__ = ["AdapterImportError", "AdapterManager", "LoraAdapter", "NoAdapterSlotError"]
