"""Shared cache namespaces, granted by the admin to member tenants.

A request's texts are cached in the tenant's own namespace unless it names a shared one
(``"namespace": "team"``); then a text one member sent is a hit for every other member — which is
the point, and also a signal (a hit tells the caller that somebody sent that exact text). So in
multi-tenant mode a shared namespace is something tenants are *granted*: the admin creates it
with its members (``PUT /admin/namespaces/{ns}``), adds and removes members, and a tenant naming
a namespace it does not belong to gets 403 ``forbidden`` with one message whether the namespace
exists or not. In single-tenant mode (no keys) every namespace is the one tenant's, as before.

Storage: ``<data dir>/namespaces.json`` ``{"namespaces": {ns: {"members": [...], "created": ...}}}``,
replaced atomically under an ``flock`` (read-modify-write is serialised across processes), and
re-read when the file changes (one ``stat`` per check), so replicas and the CLI sharing the data
folder see a grant or a revocation on their next request.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from headfleet.errors import ForbiddenError, NotFoundError, ValidationError
from headfleet.atomic import locked, write_json_atomic
from headfleet.names import check_name


class NamespaceStore:
    """Shared namespaces and their member tenants (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._ident: tuple | None = None
        self._data: dict[str, dict[str, Any]] = {}

    # -- checks -----------------------------------------------------------------------------------
    def check(self, tenant: str, namespace: str) -> None:
        """Raise ForbiddenError unless ``tenant`` is a member of ``namespace`` (ValidationError for a
        malformed name). The message is the same for a namespace that does not exist."""
        check_name(namespace, "namespace")
        entry = self._current().get(namespace)
        if entry is None or tenant not in entry["members"]:
            raise ForbiddenError(f"namespace {namespace!r} is not granted to this tenant; the admin grants shared "
                                 "namespaces (PUT /admin/namespaces/{namespace}); omit \"namespace\" to use your own")

    def list(self) -> dict[str, dict[str, Any]]:
        return {ns: dict(e) for ns, e in sorted(self._current().items())}

    def get(self, namespace: str) -> dict[str, Any]:
        entry = self._current().get(check_name(namespace, "namespace"))
        if entry is None:
            raise NotFoundError(f"no shared namespace named {namespace!r}")
        return {"namespace": namespace, **entry}

    # -- admin ------------------------------------------------------------------------------------
    def put(self, namespace: str, members: list[str]) -> dict[str, Any]:
        """Create ``namespace`` or replace its member list."""
        check_name(namespace, "namespace")
        members = sorted({check_name(m, "tenant") for m in members})

        def change(data: dict) -> None:
            old = data.get(namespace) or {}
            data[namespace] = {"members": members, "created": old.get("created") or _now()}

        return self._update(namespace, change)

    def add_member(self, namespace: str, tenant: str) -> dict[str, Any]:
        check_name(tenant, "tenant")

        def change(data: dict) -> None:
            entry = self._existing(data, namespace)
            entry["members"] = sorted(set(entry["members"]) | {tenant})

        return self._update(namespace, change)

    def remove_member(self, namespace: str, tenant: str) -> dict[str, Any]:
        def change(data: dict) -> None:
            entry = self._existing(data, namespace)
            if tenant not in entry["members"]:
                raise NotFoundError(f"tenant {tenant!r} is not a member of namespace {namespace!r}")
            entry["members"] = [m for m in entry["members"] if m != tenant]

        return self._update(namespace, change)

    def delete(self, namespace: str) -> None:
        def change(data: dict) -> None:
            self._existing(data, namespace)
            del data[namespace]

        self._update(namespace, change)

    # -- file -------------------------------------------------------------------------------------
    @staticmethod
    def _existing(data: dict, namespace: str) -> dict[str, Any]:
        entry = data.get(check_name(namespace, "namespace"))
        if entry is None:
            raise NotFoundError(f"no shared namespace named {namespace!r}")
        return entry

    def _update(self, namespace: str, change) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path.with_name(f".{self.path.name}.lock")):
            data = self._read()
            change(data)
            write_json_atomic(self.path, {"namespaces": data})
        with self._lock:
            self._ident = None  # re-read on the next check
        return {"namespace": namespace, **data[namespace]} if namespace in data else {"namespace": namespace}

    def _current(self) -> dict[str, dict[str, Any]]:
        try:
            st = os.stat(self.path)
            ident: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            ident = None
        with self._lock:
            if ident != self._ident or ident is None:
                self._data = self._read() if ident is not None else {}
                self._ident = ident
            return self._data

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ValidationError(f"namespaces file is unreadable ({type(exc).__name__}); fix or remove it") from None
        spaces = raw.get("namespaces") if isinstance(raw, dict) else None
        if not isinstance(spaces, dict):
            raise ValidationError("namespaces file must hold {\"namespaces\": {name: {\"members\": [...]}}}")
        return {ns: {"members": list(e.get("members") or []), "created": e.get("created")}
                for ns, e in spaces.items() if isinstance(e, dict)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
