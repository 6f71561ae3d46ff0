"""Dashboard sessions: a signed, expiring cookie instead of a key in every request.

A browser cannot send ``Authorization: Bearer`` when it navigates, and keys never go in URLs, so
the login form posts the API key once and gets a session cookie back:

    cookie = "v1." + b64url(json({"sub", "kid", "iat", "exp"})) + "." + b64url(HMAC-SHA256(secret, that))

- ``sub``: the tenant, or ``None`` for the admin key; ``kid``: which key it was — a tenant key's
  key id (the first 12 hex digits of its SHA-256, as ``/admin/tenants`` lists it), or for the
  admin key 16 hex digits of HMAC(secret, the admin key's digest). Every request re-checks the
  kid, so revoking a key (or changing the admin key) ends its sessions at once.
- Attributes: ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends
  it), ``Path=/dashboard``, ``Max-Age`` = the session's life, ``Secure`` when served over https.
- A cookie whose signature, format or expiry does not check out is no session: the pages send the
  browser back to the login form.

The signing secret is **32 random bytes persisted in the data folder** (``<data>/dashboard.secret``,
created with ``O_EXCL`` and mode 0600, hex), not derived from the admin key: a deployment with
only tenant keys (``HEADFLEET_API_KEYS``) has no admin key, and replicas sharing the data folder
share the secret, so a session works on every replica. Deleting the file logs everybody out.

Login CSRF: the form carries a token that must equal the ``hf_dash_csrf`` cookie the login page
set (double submit; the cookie is ``SameSite=Strict``, so another site can neither read nor send
it), and a POST whose ``Origin`` header names another origin is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

SESSION_COOKIE = "hf_dash"
CSRF_COOKIE = "hf_dash_csrf"
COOKIE_PATH = "/dashboard"
SESSION_SECONDS = 8 * 3600  # a working day; then the login form again
CSRF_SECONDS = 3600  # how long a login form stays usable
SECRET_FILE = "dashboard.secret"


class Session(NamedTuple):
    """Who a valid cookie speaks for: ``tenant`` is None for the admin key."""

    tenant: str | None
    kid: str
    expires: int  # epoch seconds

    @property
    def admin(self) -> bool:
        return self.tenant is None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(data_dir: Path) -> bytes:
    """The 32-byte signing secret from ``<data_dir>/dashboard.secret``, created (0600, O_EXCL) when
    missing; a concurrent creator's file wins. OSError when the folder is not writable."""
    path = Path(data_dir) / SECRET_FILE
    for _ in range(3):
        try:
            text = path.read_text().strip()
            if len(text) == 64:
                return bytes.fromhex(text)
            raise ValueError(f"{path} must hold 64 hex digits; delete it to make a new one (everyone logs out)")
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            time.sleep(0.01)  # another process is writing it: read theirs
            continue
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
    return bytes.fromhex(path.read_text().strip())


class Signer:
    """Signs and checks session cookies and login CSRF tokens with one secret."""

    def __init__(self, secret: bytes, *, session_seconds: int = SESSION_SECONDS, clock=time.time):
        if len(secret) < 16:
            raise ValueError("the dashboard secret must be at least 16 bytes")
        self.secret = secret
        self.session_seconds = session_seconds
        self.clock = clock

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self.secret, data, hashlib.sha256).digest()

    def admin_kid(self, admin_digest: str) -> str:
        """16 hex digits naming the admin key without revealing its digest."""
        return self._mac(b"admin:" + admin_digest.encode()).hex()[:16]

    def issue(self, tenant: str | None, kid: str) -> str:
        """A cookie value for ``tenant`` (None: admin) that expires ``session_seconds`` from now."""
        now = int(self.clock())
        payload = _b64(json.dumps({"sub": tenant, "kid": kid, "iat": now, "exp": now + self.session_seconds},
                                  separators=(",", ":")).encode())
        body = f"v1.{payload}"
        return f"{body}.{_b64(self._mac(body.encode()))}"

    def verify(self, value: str | None) -> Session | None:
        """The session a cookie value stands for, or None: missing, malformed, tampered or expired."""
        if not value or len(value) > 1024:
            return None
        parts = value.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            return None
        try:
            sig = _unb64(parts[2])
            if not hmac.compare_digest(sig, self._mac(f"v1.{parts[1]}".encode())):
                return None
            doc = json.loads(_unb64(parts[1]))
        except (ValueError, TypeError):
            return None
        if not isinstance(doc, dict):
            return None
        sub, kid, exp = doc.get("sub"), doc.get("kid"), doc.get("exp")
        if not (sub is None or isinstance(sub, str)) or not isinstance(kid, str) or not isinstance(exp, int):
            return None
        if exp <= self.clock():
            return None
        return Session(sub, kid, exp)

    # -- login CSRF (double submit) -------------------------------------------------------------
    def csrf_token(self) -> str:
        """A fresh token for the login form and its cookie: ``nonce.expiry.mac``."""
        nonce, exp = secrets.token_urlsafe(18), int(self.clock()) + CSRF_SECONDS
        body = f"{nonce}.{exp}"
        return f"{body}.{_b64(self._mac(b'csrf:' + body.encode()))}"

    def csrf_ok(self, form_token: str | None, cookie_token: str | None) -> bool:
        """The form's token equals the cookie's, and it is one this secret made, unexpired."""
        if not form_token or not cookie_token or not hmac.compare_digest(form_token, cookie_token):
            return False
        parts = cookie_token.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return False
        try:
            good = hmac.compare_digest(_unb64(parts[2]), self._mac(b"csrf:" + f"{parts[0]}.{parts[1]}".encode()))
        except (ValueError, TypeError):
            return False
        return good and int(parts[1]) > self.clock()
