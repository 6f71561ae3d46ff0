"""Classifier resolution and planning: references to loaded versions, pinned while a request holds
them; which embedding (namespace) each classifier reads.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

from headfleet.errors import CorruptVersionError, NotFoundError, ValidationError
from headfleet.names import NAME_RE, check_name
from headfleet.engine.types import ADAPTER_LOAD, ADAPTER_NS, adapter_id, parse_adapter_id

log = logging.getLogger(__name__)


class ResolutionMixin:
    def plan(self, tenant: str, resolved: list[tuple[str, str, dict]],
             namespace: str | None = None) -> list[tuple[str, list[tuple[str, str, dict]]]]:
        """Group resolved classifiers by the embedding they read: head classifiers share the
        tenant's (or the shared) namespace; each LoRA classifier has its adapter's own,
        ``adapter:<tenant>/<name>@<version>#<adapter sha256 prefix>``."""
        base = self.namespace_for(tenant, namespace)
        groups: dict[str, list[tuple[str, str, dict]]] = {}
        for item in resolved:
            _, key, manifest = item
            adapter = manifest.get("adapter")
            ns = ADAPTER_NS + adapter_id(key, manifest) if adapter else base
            groups.setdefault(ns, []).append(item)
        return list(groups.items())


    def _manifest(self, tenant: str, ref: str) -> dict:
        """Resolve ``name[@version|@alias]`` with an in-process cache keyed on the alias file's identity.

        One stat per classifier per call: a train, alias move or delete by another process
        (the CLI beside a running server) is seen on the next request.
        """
        name = ref.partition("@")[0]
        if not NAME_RE.match(name) or not NAME_RE.match(tenant):
            return self.registry.resolve(tenant, ref)  # raises the registry's own error for the bad name
        paths = self._alias_paths.get((tenant, name))
        if paths is None:  # joined once per existing classifier: os.path.join costs as much as the stat
            folder = os.path.join(self._registry_root, tenant, name)
            paths = (os.path.join(folder, "aliases.json"), os.path.join(folder, "backbone_aliases.json"))
        try:
            st = os.stat(paths[0])
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
            self._alias_paths[(tenant, name)] = paths  # only names that exist: unknown ones never grow it
        except FileNotFoundError:
            self._resolved.pop((tenant, ref), None)
            ident = None
        if ident is not None:  # a backbone upgrade's aliases (heads.registry.BACKBONE_ALIASES_FILE) count too
            try:
                st = os.stat(paths[1])
                ident += (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                pass
        cached = self._resolved.get((tenant, ref))
        if ident is not None and cached is not None and cached[0] == ident:
            return cached[1]
        manifest = self.registry.resolve(tenant, ref)
        if ident is not None:
            self._resolved[(tenant, ref)] = (ident, manifest)
        return manifest


    def _fleet_key(self, tenant: str, ref: str, pin: bool = False,
                   timing: dict[str, float] | None = None) -> tuple[str, dict]:
        """The fleet key and manifest of ``ref``, its head loaded; a LoRA version's adapter is read and
        checked the first time it is used (on ONNX Runtime the first one also loads the backbone's
        torch copy and opens the LoRA graph), its milliseconds added to ``timing["adapter_load"]``."""
        manifest = self._manifest(tenant, ref)
        key = f"{tenant}/{manifest['name']}@{manifest['version']}"
        try:
            if pin or key not in self.fleet:
                with self._lock:
                    if key not in self.fleet:
                        _, head = self.registry.load(tenant, f"{manifest['name']}@{manifest['version']}",
                                                     self.embedder.fingerprint)
                        self.fleet.add(key, head)
                    if pin:
                        self._inflight[key] = self._inflight.get(key, 0) + 1
            adapter = manifest.get("adapter")
            if adapter:
                aid = adapter_id(key, manifest)
                if aid not in self._verified_adapters:  # refuse a damaged adapter here, not inside a shared batch
                    t0 = time.perf_counter()
                    try:
                        # the adapter layers first (on ONNX Runtime the torch copy and, on the CPU, the
                        # LoRA graph), so that cost is this phase's, not a shared batch's
                        self.adapter_manager()
                        self._read_adapter(tenant, manifest)
                    finally:
                        if timing is not None:
                            timing[ADAPTER_LOAD] = timing.get(ADAPTER_LOAD, 0.0) + (time.perf_counter() - t0) * 1e3
                    self._verified_adapters.add(aid)
        except CorruptVersionError:
            for hook in self.corrupt_hooks:
                hook(key)
            log.error("refused corrupt classifier version %s", key)
            raise
        return key, manifest

    def resolve(self, tenant: str, classifiers: Sequence[str], errors: dict[str, dict] | None = None, *,
                pin: bool = False, targets: dict[str, str] | None = None,
                timing: dict[str, float] | None = None) -> list[tuple[str, str, dict]]:
        """``[(ref as asked, fleet key, manifest)]`` for distinct refs, heads loaded into the fleet.

        A version whose files fail their sha256 check raises CorruptVersionError; with ``errors``
        given, it is recorded there instead (``ref -> {"error", "error_type"}``) and the other
        classifiers are still served — unless every one of them failed, which raises the first.
        ``pin``: keep every resolved version loaded until :meth:`release` (a request in flight).
        ``targets``: ref -> the ref to load in its place (an experiment's arm); the entry (and an
        error) still carries the ref as asked.
        ``timing``: milliseconds spent reading adapters not used since start (with, on ONNX Runtime,
        the backbone's torch copy and the LoRA graph) are added to its ``"adapter_load"``.
        """
        if not classifiers:
            raise ValidationError("classifiers must name at least one classifier")
        out = []
        first: CorruptVersionError | None = None
        try:
            for ref in dict.fromkeys(classifiers):
                try:
                    key, manifest = self._fleet_key(tenant, targets.get(ref, ref) if targets else ref, pin, timing)
                except CorruptVersionError as exc:
                    if errors is None:
                        raise
                    errors[ref] = {"error": exc.message, "error_type": exc.error_type}
                    first = first or exc
                    continue
                out.append((ref, key, manifest))
            if not out and first is not None:
                raise first
        except BaseException:
            if pin:
                self.release(out)
            raise
        return out

    def release(self, resolved: Sequence[tuple[str, str, dict]]) -> None:
        """Undo :meth:`resolve`'s ``pin`` for a request that completed (or failed); a version unloaded
        while the request held it goes now."""
        with self._lock:
            for _, key, _ in resolved:
                n = self._inflight.get(key, 0) - 1
                if n > 0:
                    self._inflight[key] = n
                    continue
                self._inflight.pop(key, None)
                if key in self._retired:
                    self._retired.discard(key)
                    if key in self.fleet:
                        self.fleet.remove(key)


    def _unload_unaliased(self, tenant: str, name: str) -> None:
        """Drop loaded versions of ``name`` that no alias points at any more (a request naming
        one explicitly loads it again)."""
        try:
            keep = {f"{tenant}/{name}@{v}" for v in self.registry.aliases(tenant, name).values()}
        except NotFoundError:
            keep = set()
        prefix = f"{tenant}/{name}@"
        with self._lock:
            for key in self.fleet.keys():
                if key.startswith(prefix) and key not in keep:
                    if self._inflight.get(key):
                        self._retired.add(key)  # a request still holds it: the last release unloads it
                    else:
                        self.fleet.remove(key)
            self._retired -= keep
        if self.adapters is not None:
            self.adapters.forget_matching(lambda aid: aid.startswith(prefix)
                                          and "/".join(parse_adapter_id(aid)[:2]) not in keep)

    def delete(self, tenant: str, name: str) -> None:
        """Remove a classifier with all its versions, and unload its heads."""
        check_name(name, "classifier name")
        self.registry.delete(tenant, name)
        self._resolved = {k: v for k, v in self._resolved.items() if k[0] != tenant or k[1].partition("@")[0] != name}
        self._unload_unaliased(tenant, name)

