"""The session cookie and the login CSRF token: signed, expiring, refused when touched."""

from __future__ import annotations

import os
import stat

from headfleet.service.dashboard.session import SECRET_FILE, Signer, load_secret


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_session_round_trips_and_expires():
    clock = Clock(1_000_000.0)
    s = Signer(b"k" * 32, session_seconds=60, clock=clock)
    value = s.issue("acme", "abc123")
    got = s.verify(value)
    assert got is not None and got.tenant == "acme" and got.kid == "abc123" and not got.admin
    assert got.expires == 1_000_060
    clock.t += 59
    assert s.verify(value) is not None
    clock.t += 1
    assert s.verify(value) is None  # expired at exactly exp
    admin = Signer(b"k" * 32, clock=Clock(0)).issue(None, "a" * 16)
    assert Signer(b"k" * 32, clock=Clock(0)).verify(admin).admin


def test_a_touched_cookie_is_no_session():
    s = Signer(b"k" * 32)
    value = s.issue("acme", "abc123")
    head, payload, sig = value.split(".")
    other = Signer(b"k" * 32).issue("globex", "abc123").split(".")[1]
    assert s.verify(f"{head}.{other}.{sig}") is None  # another tenant's payload, this signature
    assert s.verify(f"{head}.{payload}.{sig[:-2]}AA") is None
    assert s.verify(f"v2.{payload}.{sig}") is None
    assert Signer(b"x" * 32).verify(value) is None  # another secret
    for junk in ("", "v1", "v1..", "v1.%%%.%%%", "a.b.c.d", "v1." + "A" * 2000 + ".x"):
        assert s.verify(junk) is None


def test_csrf_tokens_are_double_submitted_and_expire():
    clock = Clock(5_000.0)
    s = Signer(b"k" * 32, clock=clock)
    token = s.csrf_token()
    assert s.csrf_ok(token, token)
    assert not s.csrf_ok(token, None) and not s.csrf_ok(None, token)
    assert not s.csrf_ok(token, s.csrf_token())  # form and cookie from two different pages
    forged = token.rsplit(".", 1)[0] + ".AAAA"
    assert not s.csrf_ok(forged, forged)
    assert not Signer(b"x" * 32, clock=clock).csrf_ok(token, token)
    clock.t += 3601
    assert not s.csrf_ok(token, token)


def test_the_secret_is_random_persisted_and_private(tmp_path):
    a = load_secret(tmp_path)
    assert len(a) == 32 and load_secret(tmp_path) == a
    mode = stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode)
    assert mode == 0o600, oct(mode)
    assert load_secret(tmp_path / "other") != a
