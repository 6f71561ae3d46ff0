"""The backbone a user gets without setting HEADFLEET_BACKEND / HEADFLEET_PRECISION.

A new data folder starts on the fastest backbone measured for the machine (ONNX Runtime on a CPU)
and records it; a folder that already holds classifiers stays on torch fp32, the default they
were trained under, until ``headfleet backbone plan``/``apply`` moves it. The rest of the suite
pins HEADFLEET_BACKEND=torch (tests/conftest.py); these tests unset it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from headfleet.embedder import Embedder
from headfleet.engine import Engine
from headfleet.errors import ConflictError
from headfleet.heads import examples_from_records
from headfleet.settings import (FORMER_DEFAULT, NEW_FOLDER_DEFAULT, RECORDED_DEFAULT, Settings,
                                cpu_has_int8_dot, fast_default)

EXPECTED = ("onnx", "w8a8") if cpu_has_int8_dot() else ("onnx", "fp32")


@pytest.fixture
def unset_backend(monkeypatch):
    monkeypatch.delenv("HEADFLEET_BACKEND", raising=False)
    monkeypatch.delenv("HEADFLEET_PRECISION", raising=False)
    monkeypatch.delenv("HEADFLEET_DEVICE", raising=False)


def _data(tmp_path):
    return dict(data_dir=str(tmp_path / "data"), device="cpu")


def test_a_new_folder_gets_onnx_runtime_and_an_old_one_keeps_torch(tmp_path, unset_backend):
    assert fast_default("cpu") == EXPECTED
    new = Settings.from_env(**_data(tmp_path))
    assert (new.backend, new.precision, new.backbone_source) == (*EXPECTED, NEW_FOLDER_DEFAULT)
    # a folder with a classifier from before the default changed (and no backbone.json) stays on torch
    (tmp_path / "data" / "registry" / "acme" / "spam").mkdir(parents=True)
    old = Settings.from_env(**_data(tmp_path))
    assert (old.backend, old.precision, old.backbone_source) == ("torch", "fp32", FORMER_DEFAULT)


def test_a_folder_recorded_on_the_former_int8_default_keeps_it(tmp_path, unset_backend):
    """w8a8 replaced MatMulNBits int8 as the VNNI default: a folder that int8 was recorded for keeps
    its backbone (its heads and cached vectors are int8's) until backbone plan / apply moves it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "backbone.json").write_text(json.dumps(
        {"backend": "onnx", "precision": "int8", "model": None, "chosen": NEW_FOLDER_DEFAULT}))
    s = Settings.from_env(**_data(tmp_path))
    assert (s.backend, s.precision, s.backbone_source) == ("onnx", "int8", RECORDED_DEFAULT)


def test_an_explicit_backend_wins_and_one_variable_keeps_the_other_default(tmp_path, unset_backend, monkeypatch):
    monkeypatch.setenv("HEADFLEET_BACKEND", "torch")
    s = Settings.from_env(**_data(tmp_path))
    assert (s.backend, s.precision, s.backbone_source) == ("torch", "fp32", "environment")
    monkeypatch.setenv("HEADFLEET_BACKEND", "onnx")
    s = Settings.from_env(**_data(tmp_path))
    assert (s.backend, s.precision) == ("onnx", "fp32")
    monkeypatch.delenv("HEADFLEET_BACKEND")
    monkeypatch.setenv("HEADFLEET_PRECISION", "int8")  # precision alone: the backend's old default, refused later
    s = Settings.from_env(**_data(tmp_path))
    assert (s.backend, s.precision) == ("torch", "int8")


def test_the_first_open_records_the_choice_so_the_folder_keeps_it(tmp_path, unset_backend, onnx_cache):
    settings = Settings.from_env(**_data(tmp_path))
    backbone = Embedder.load(max_length=128, backend=settings.backend, precision=settings.precision,
                             cache_dir=onnx_cache)
    with Engine.open(settings, embedder=backbone) as engine:
        engine.train("acme", "spam", examples_from_records([("win a prize now", "spam"), ("lunch at noon?", "ham")] * 4))
    recorded = json.loads((tmp_path / "data" / "backbone.json").read_text())
    assert (recorded["backend"], recorded["precision"], recorded["fingerprint"]) == (*EXPECTED, backbone.fingerprint)
    # the folder now holds classifiers: the record, not the torch rule for old folders, decides
    again = Settings.from_env(**_data(tmp_path))
    assert (again.backend, again.precision, again.backbone_source) == (*EXPECTED, RECORDED_DEFAULT)
    from headfleet.lifecycle.backbone_apply import rollback

    with pytest.raises(ConflictError, match="nothing was applied"):
        rollback(again)
    assert (tmp_path / "data" / "backbone.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_on_defaults_serves_the_examples_on_onnx_runtime(tmp_path):
    """``scripts/run`` as a new user runs it: no backend set, a new data folder, the examples."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HEADFLEET_BACKEND", "HEADFLEET_PRECISION")}
    env.update(HF_HUB_OFFLINE="1", HEADFLEET_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, "-m", "headfleet.service.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.5)
        info = httpx.get(base + "/info").json()["backbone"]
        assert (info["backend"], info["precision"], info["source"]) == (*EXPECTED, NEW_FOLDER_DEFAULT)
        body = {"texts": ["You have won a free iPhone! Click the link to claim your prize",
                          "The checkout page has been failing for all customers since noon"],
                "classifiers": ["spam", "urgency"]}
        out = httpx.post(base + "/classify", json=body, timeout=60).json()
        labels = [(r["classifications"]["spam"]["label"], r["classifications"]["urgency"]["label"])
                  for r in out["results"]]
        assert labels[0][0] == "spam" and labels[1][0] == "ham", labels
        assert out["cache"]["computed"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=60)
