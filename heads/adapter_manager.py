"""The adapter manager: which LoRA adapter sits in which device slot (vLLM's model manager, for an encoder).

Adapters live on disk (the registry), in host memory (an LRU of at most ``max_loaded``) and in
device slots (an LRU of the bank's ``max_slots``). ``acquire`` hot-loads what a batch needs and
pins it until ``release``, so an adapter is never evicted from under a forward in flight; when
every slot is pinned by batches in flight, ``acquire`` raises :class:`NoAdapterSlotError` rather
than waiting or guessing. How it is kept: every change to the id -> slot table and every slot
write happens under one lock, and a slot is only written after its owner's pins reached zero.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from headfleet.errors import NoAdapterSlotError

if TYPE_CHECKING:
    from headfleet.heads.adapters import LoraAdapter


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
        """Slots for the distinct ``ids`` of one batch (id -> slot index), pinned until :meth:`release`.

        All or nothing. ``load`` replaces the manager's loader for this call. Raises
        :class:`NoAdapterSlotError` when the batch has more ids than slots or every slot is held by
        batches in flight, ``KeyError`` for an id neither loaded nor loadable, and whatever ``load``
        raises (nothing stays pinned then)."""
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
        """Unpin what :meth:`acquire` pinned for these ids (each id once); unknown ids are ignored."""
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
        """The device slot ``aid`` sits in, or -1 when it is in none."""
        with self._lock:
            entry = self._host.get(aid)
            return -1 if entry is None else entry.slot

    def snapshot(self) -> dict:
        """Slot, host-memory and pin counts plus the load/eviction counters, for metrics."""
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


__all__ = ["AdapterManager", "NoAdapterSlotError", "manager_for"]
