"""The OpenAPI document tells the truth: schemathesis (``--checks all``) against a real server.

Every generated request must get an answer the document promises — documented status, documented
body shape (``{"error", "error_type"}``, OpenAI's shape on ``/v1``), content type and headers —
no 5xx, schema-valid requests accepted and schema-violating ones rejected (within the limits
``schemathesis.toml`` beside this file explains). Bounded: a fixed seed and a few examples per
operation, one run with a tenant's key and one with the admin key.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from http_server import running

TENANT_KEY, ADMIN_KEY = "key-fuzz", "key-fuzz-admin"
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 8


def _st() -> str:
    exe = Path(sys.executable).with_name("st")
    if exe.exists():
        return str(exe)
    found = shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: scripts/test installs the test extras")
    return found


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    with running(minilm, tmp_path_factory.mktemp("fuzz"), api_keys=f"fuzz:{TENANT_KEY}",
                 admin_key=ADMIN_KEY) as srv:
        yield srv


def _schemathesis(server, tmp_path, key: str, *filters: str) -> subprocess.CompletedProcess:
    cmd = [_st(), "--config-file", str(CONFIG), "run", f"{server.url}/schema", "--checks", "all",
           "--max-examples", str(EXAMPLES), "--seed", "7", "--workers", "1", "--no-color",
           "--request-timeout", "60", "--header", f"Authorization: Bearer {key}",
           "--report", "junit", "--report-dir", str(tmp_path), *filters]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_tenant_operations_answer_what_the_document_promises(server, tmp_path):
    out = _schemathesis(server, tmp_path, TENANT_KEY, "--exclude-path-regex", "^/(admin|metrics)")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert " passed" in out.stdout or "No issues found" in out.stdout, out.stdout[-3000:]


def test_admin_operations_answer_what_the_document_promises(server, tmp_path):
    out = _schemathesis(server, tmp_path, ADMIN_KEY, "--include-path-regex", "^/(admin|metrics)")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
