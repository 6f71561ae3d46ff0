"""Fixtures for the HTTP tests: servers built on the session's MiniLM backbone."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from http_server import running


@pytest.fixture(scope="module")
def single(minilm, tmp_path_factory):
    """Single-tenant server (no keys) with the example classifiers trained at start."""
    with running(minilm, tmp_path_factory.mktemp("single")) as server:
        yield server


@pytest.fixture(scope="module")
def client(single):
    with httpx.Client(base_url=single.url, timeout=60) as c:
        yield c


@pytest.fixture
def start_server(minilm, tmp_path):
    """Start a server with settings overrides; stopped at the end of the test."""
    stack = contextlib.ExitStack()

    def start(**overrides):
        return stack.enter_context(running(minilm, tmp_path / f"data{len(stack._exit_callbacks)}", **overrides))

    with stack:
        yield start
