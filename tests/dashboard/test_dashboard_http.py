"""The dashboard's HTTP contract without a browser: redirects, CSRF and Origin checks, error bodies."""

from __future__ import annotations

import re

import httpx
import pytest

from dashboard_world import ACME


@pytest.fixture
def anon(world):
    with httpx.Client(base_url=world.url, timeout=120, follow_redirects=False) as c:
        yield c


def _form(c: httpx.Client) -> str:
    r = c.get("/dashboard/login")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
    return re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)


def _error(r: httpx.Response, status: int, error_type: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type and body["error"]


def test_pages_without_a_session_redirect_to_login(anon):
    for path in ("/dashboard", "/dashboard/t/acme", "/dashboard/t/acme/classifiers/spam", "/dashboard/fleet",
                 "/dashboard/t/acme/experiments/exp-000000000000"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login", path


def test_login_csrf_origin_and_bad_input_are_4xx_with_the_error_body(anon):
    _error(anon.post("/dashboard/login", data={"key": ACME, "csrf": "x"}), 403, "forbidden")  # no CSRF cookie
    token = _form(anon)
    _error(anon.post("/dashboard/login", data={"key": ACME, "csrf": token + "x"}), 403, "forbidden")
    _error(anon.post("/dashboard/login", data={"key": ACME, "csrf": token}, headers={"Origin": "https://evil.example"}),
           403, "forbidden")
    _error(anon.post("/dashboard/login", data={"key": ACME, "csrf": token}, headers={"Origin": "null"}), 403, "forbidden")
    _error(anon.post("/dashboard/login", json={"key": ACME, "csrf": token}), 422, "validation_error")
    _error(anon.post("/dashboard/login", data={"csrf": token}), 422, "validation_error")
    _error(anon.post("/dashboard/login", data={"key": "nope", "csrf": token}), 401, "unauthorized")
    _error(anon.post("/dashboard/login", data={"key": "k" * 600, "csrf": token}), 401, "unauthorized")
    _error(anon.post("/dashboard/login", content=b"\xff\xfe", headers={"content-type": "application/x-www-form-urlencoded"}),
           422, "validation_error")
    _error(anon.put("/dashboard/login"), 405, "method_not_allowed")
    r = anon.post("/dashboard/login", data={"key": ACME, "csrf": token}, headers={"Origin": str(anon.base_url).rstrip("/")})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    assert ACME not in r.headers["location"] and ACME not in r.text
    session = anon.cookies.get("hf_dash")
    assert session and ACME not in session
    # signed in: bad query input and unknown things are 4xx with the error body, never a 500
    _error(anon.get("/dashboard/t/acme?page=abc"), 422, "validation_error")
    _error(anon.get("/dashboard/t/acme?page=0"), 422, "validation_error")
    _error(anon.get("/dashboard/t/acme?q=" + "x" * 500), 422, "validation_error")
    _error(anon.get("/dashboard/t/acme/classifiers/no-such"), 404, "not_found")
    _error(anon.get("/dashboard/t/acme/classifiers/spam@99"), 404, "not_found")
    _error(anon.get("/dashboard/t/acme/classifiers/BAD%20NAME"), 422, "validation_error")
    _error(anon.get("/dashboard/t/acme/experiments/exp-000000000000"), 404, "not_found")
    _error(anon.get("/dashboard/t/acme/experiments/../../stats"), 404, "not_found")
    _error(anon.get("/dashboard/fleet"), 403, "forbidden")
    _error(anon.get("/dashboard/static/../../pyproject.toml"), 404, "not_found")
    assert anon.get("/dashboard/t/acme?page=99").status_code == 200  # clamped to the last page
    r = anon.post("/dashboard/logout", headers={"Origin": "https://evil.example"})
    _error(r, 403, "forbidden")
    r = anon.post("/dashboard/logout")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert anon.get("/dashboard/t/acme").status_code == 303


def test_the_secret_file_is_private(world):
    import os
    import stat

    mode = stat.S_IMODE(os.stat(world.data / "dashboard.secret").st_mode)
    assert mode == 0o600, oct(mode)


def test_the_dashboard_is_not_in_the_api_document(world):
    doc = httpx.get(f"{world.url}/schema/openapi.json", timeout=60).json()
    assert not [p for p in doc["paths"] if p.startswith("/dashboard")]


def test_single_tenant_mode_needs_no_login(minilm, tmp_path):
    from http_server import running

    with running(minilm, tmp_path / "single", examples=False) as server, \
            httpx.Client(base_url=server.url, timeout=120, follow_redirects=False) as c:
        r = c.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/t/default"
        assert c.get("/dashboard/login").headers["location"] == "/dashboard/t/default"
        page = c.get("/dashboard/t/default")
        assert page.status_code == 200 and "Tenant default" in page.text and "Sign out" not in page.text
        _error(c.get("/dashboard/t/other"), 404, "not_found")
        _error(c.get("/dashboard/fleet"), 403, "forbidden")


def test_a_lora_classifiers_page_names_its_adapter(minilm, tmp_path, random_lora):
    """The classifier page says a LoRA classifier's head reads an adapter, with its rank and targets."""
    from http_server import running

    from headfleet.engine import Engine
    from headfleet.settings import Settings

    data = tmp_path / "single"
    with Engine.open(Settings(data_dir=data, device="cpu"), minilm) as engine:
        random_lora(engine, "default", "legal")
    with running(minilm, data, examples=False) as server, \
            httpx.Client(base_url=server.url, timeout=120, follow_redirects=False) as c:
        page = c.get("/dashboard/t/default/classifiers/legal")
        assert page.status_code == 200
        assert "Kind logreg on a LoRA adapter (rank 4: query, value)" in page.text
