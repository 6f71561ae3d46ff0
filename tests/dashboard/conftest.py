"""Fixtures for the dashboard tests: the world of ``dashboard_world.build`` (a real server after real
traffic) and a real headless Chromium (Debian's ``chromium`` package, driven by Playwright for Python).
Screenshots go to ``tests/dashboard/artefacts/`` (or ``$HEADFLEET_TEST_ARTEFACTS``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboard_world import build  # noqa: E402


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # a missing test dependency fails the run; it is never a skip
        pytest.fail("chromium is not installed: run scripts/test, which installs Debian's chromium package")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path):
    """Closed at the end of its module: between its calls Playwright's sync API leaves its event loop
    marked as running in this thread, which would break later tests that start one of their own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def artefacts() -> Path:
    out = Path(os.environ.get("HEADFLEET_TEST_ARTEFACTS") or Path(__file__).resolve().parent / "artefacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def world(minilm, tmp_path_factory):
    with build(minilm, tmp_path_factory.mktemp("dashboard")) as w:
        yield w
