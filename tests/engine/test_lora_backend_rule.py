"""One rule for LoRA on a backend that cannot carry adapters (ONNX Runtime): asking to create one
is the caller's mistake (422), a stored one this configuration cannot serve is the service's (503)."""

from __future__ import annotations

import pytest

from headfleet.embedder import Embedder
from headfleet.errors import BackendError, ValidationError
from headfleet.heads import examples_from_records
from headfleet.engine import Engine
from headfleet.settings import Settings


@pytest.fixture(scope="module")
def onnx_engine(onnx_cache, tmp_path_factory):
    emb = Embedder.load(max_length=64, backend="onnx", precision="fp32", cache_dir=onnx_cache)
    with Engine.open(Settings(data_dir=tmp_path_factory.mktemp("onnx-lora"), device="cpu", backend="onnx"),
                     embedder=emb) as engine:
        yield engine


def test_creating_a_lora_classifier_on_onnx_is_a_422(onnx_engine):
    data = examples_from_records([(f"text {i}", "ab"[i % 2]) for i in range(8)])
    with pytest.raises(ValidationError) as e:  # the service's table: ValidationError -> 422
        onnx_engine.train_lora("acme", "legal", data)
    assert "HEADFLEET_BACKEND=torch" in e.value.message


def test_a_stored_lora_classifier_on_onnx_is_a_503(onnx_engine):
    stored = {"id": "legal@1", "name": "legal", "version": 1, "adapter": {"sha256": "ab" * 32}}
    with pytest.raises(BackendError) as e:  # the service's table: BackendError -> 503
        onnx_engine.plan("acme", [("legal", "acme/legal@1", stored)])
    assert not isinstance(e.value, ValidationError) and "'legal@1'" in e.value.message and "onnx" in e.value.message
