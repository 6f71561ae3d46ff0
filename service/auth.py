"""API keys -> tenants, and the admin key.

Keys come from two places: the keys file (``<data_dir>/keys.json`` unless configured; managed
through the admin endpoints; it holds only SHA-256 digests of keys, never a key) and the
``HEADFLEET_API_KEYS`` environment variable (``tenant:key,tenant:key``), for deployments that
inject secrets. With neither and no admin key, the service is single-tenant: every request is
the ``default`` tenant, and ``serve`` binds to loopback only.

Clients send ``Authorization: Bearer <key>`` (what the OpenAI client sends) or ``X-API-Key``.

Shared by replicas (``headfleet serve --ray``, or several ``serve`` on one data folder): every
lookup stats the keys file (one ``stat``) and re-reads it when its identity (inode, mtime, size)
changed, so a key created or revoked through one replica is honoured by every other at its next
request. ``create`` and ``revoke`` re-read the file and rewrite it under an ``flock`` on
``<keys file>.lock``, so two replicas changing keys at once both land.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from headfleet.errors import ConflictError, ForbiddenError, NotFoundError, UnauthorizedError, ValidationError
from headfleet.atomic import write_json_atomic
from headfleet.names import check_name

SINGLE_TENANT = "default"
KEY_PREFIX = "hf_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_from_headers(headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key else None


class KeyStore:
    """Resolves keys to tenants; the admin key is compared in constant time."""

    def __init__(self, path: Path, env_keys: str | None = None, admin_key: str | None = None):
        self.path = Path(path)
        self.admin_digest = digest(admin_key) if admin_key else None
        self._lock = threading.Lock()
        self._env: dict[str, str] = {}  # digest -> tenant
        for item in (env_keys or "").split(","):
            item = item.strip()
            if not item:
                continue
            tenant, sep, key = item.partition(":")
            if not sep or not key:
                raise ValidationError("HEADFLEET_API_KEYS must look like 'tenant:key,tenant:key'")
            check_name(tenant, "tenant")
            self._env[digest(key)] = tenant
        self._ident: tuple | None = None  # (inode, mtime ns, size) of the keys file last read
        self._file: dict[str, dict[str, Any]] = self._read()  # digest -> {tenant, key_id, created}

    # -- mode -------------------------------------------------------------------------------------
    @property
    def single_tenant(self) -> bool:
        if self._env or self.admin_digest:  # keys from the environment: never single-tenant, no stat needed
            return False
        self._refresh()
        return not self._file

    # -- lookups --------------------------------------------------------------------------------
    def tenant_for(self, key: str | None) -> str:
        """The tenant a request acts as; raises UnauthorizedError for a missing or unknown key."""
        if self.single_tenant:
            return SINGLE_TENANT
        if not key:
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        d = digest(key)
        tenant = self._env.get(d)
        if tenant is None:
            self._refresh()
            entry = self._file.get(d)
            tenant = entry["tenant"] if entry else None
        if tenant is None:
            if self.is_admin(key):
                raise UnauthorizedError("the admin key is not a tenant's key: tenant endpoints take a tenant key "
                                        "(create one with POST /admin/tenants/<tenant>/keys)")
            raise UnauthorizedError("unknown API key")
        return tenant

    def is_admin(self, key: str | None) -> bool:
        return bool(key and self.admin_digest and hmac.compare_digest(digest(key), self.admin_digest))

    def require_admin(self, key: str | None) -> None:
        if self.is_admin(key):
            return
        if self.admin_digest is None:
            raise ForbiddenError("no admin key is configured (set HEADFLEET_ADMIN_KEY)")
        if not key:
            raise UnauthorizedError("missing admin key: send 'Authorization: Bearer <admin key>'")
        raise ForbiddenError("this endpoint needs the admin key")

    # -- management (admin) ---------------------------------------------------------------------
    def tenants(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        self._refresh()
        with self._lock:
            for entry in self._file.values():
                out.setdefault(entry["tenant"], []).append({"key_id": entry["key_id"], "created": entry["created"],
                                                            "source": "keys_file"})
        for d, tenant in self._env.items():
            out.setdefault(tenant, []).append({"key_id": d[:12], "created": None, "source": "environment"})
        return out

    def create(self, tenant: str) -> dict[str, Any]:
        """A new key for ``tenant`` (created on first key); the key itself is shown only here."""
        check_name(tenant, "tenant")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        d = digest(key)
        entry = {"tenant": tenant, "key_id": d[:12], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._lock, self._file_lock():
            current = self._read()  # what other replicas wrote since this one last looked
            if d in current:  # 256 random bits; never, but never silently overwrite either
                raise ConflictError("key collision; try again")
            data = dict(current)
            data[d] = entry
            self._write(data)
            self._file = data
            self._ident = self._stat()
        return {"key": key, **entry}

    def revoke(self, key_id: str) -> dict[str, Any]:
        with self._lock, self._file_lock():
            current = self._read()
            hits = [d for d, e in current.items() if e["key_id"] == key_id]
            if not hits:
                self._file = current
                if any(d[:12] == key_id for d in self._env):
                    raise ValidationError(f"key {key_id!r} comes from HEADFLEET_API_KEYS; remove it there")
                raise NotFoundError(f"no key with id {key_id!r}")
            data = {d: e for d, e in current.items() if d not in hits}
            self._write(data)
            entry = current[hits[0]]
            self._file = data
            self._ident = self._stat()
        return entry

    # -- file -----------------------------------------------------------------------------------------
    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return self._ident  # cannot tell: keep what was read
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        """Re-read the keys file when another process replaced it (one stat when it did not). A file
        that became unreadable keeps the keys last read (logged), so a torn copy never locks everyone out."""
        ident = self._stat()
        if ident == self._ident:
            return
        with self._lock:
            if ident == self._ident:
                return
            try:
                self._file = self._read()
            except ValidationError as exc:  # _read recorded the identity: warned once per bad copy
                logging.getLogger(__name__).warning("keeping the keys read before: %s", exc)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An ``flock`` on ``<keys file>.lock`` across processes, for a read-modify-write of the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, dict[str, Any]]:
        """The keys file's entries (``{}`` when there is none); records the identity it read."""
        self._ident = self._stat()
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ValidationError(f"keys file {self.path} is unreadable: {exc}") from None
        keys = raw.get("keys") if isinstance(raw, dict) else None
        if not isinstance(keys, dict):
            raise ValidationError(f"keys file {self.path} must hold {{\"keys\": {{sha256: {{tenant, ...}}}}}}")
        for d, entry in keys.items():
            if not isinstance(entry, dict) or "tenant" not in entry:
                raise ValidationError(f"keys file {self.path}: entry {d[:12]} has no tenant")
            entry.setdefault("key_id", d[:12])
            entry.setdefault("created", None)
        return keys

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        """Temp file, fsync, rename: a crash leaves the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"keys": data}, mode=0o600)
