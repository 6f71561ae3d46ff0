"""Fixtures for scoring jobs: a registry with real classifiers on the real MiniLM, stores of real SMS texts."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from headfleet.heads import load_examples
from headfleet.engine import Engine
from headfleet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "engine" / "example_data"
TENANT = "acme"


@pytest.fixture(scope="session")
def sms_docs(sms_spam_path) -> list[tuple[str, str]]:
    """(id, text) for the first 240 distinct SMS texts of ../shared/data/sms_spam.csv."""
    with open(sms_spam_path, newline="", encoding="utf-8") as f:
        texts = list(dict.fromkeys(r["text"] for r in csv.DictReader(f)))
    return [(f"sms-{i:04d}", t) for i, t in enumerate(texts[:240])]


@pytest.fixture(scope="session")
def trained_registry(minilm, tmp_path_factory) -> Path:
    """A data folder whose registry holds acme/spam (logreg) and acme/urgency (mlp), trained once."""
    data = tmp_path_factory.mktemp("scoring-data")
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), minilm) as engine:
        engine.train(TENANT, "spam", load_examples(EXAMPLES / "spam.csv"))
        engine.train(TENANT, "urgency", load_examples(EXAMPLES / "urgency.csv"), kind="mlp")
    return data / "registry"


@pytest.fixture
def data_dir(tmp_path, trained_registry) -> Path:
    """A fresh data folder (empty caches) with a copy of the trained registry."""
    data = tmp_path / "data"
    shutil.copytree(trained_registry, data / "registry")
    return data


@pytest.fixture
def open_engine(minilm, data_dir):
    """``open_engine(**overrides)``: an engine on ``data_dir`` sharing the session's backbone, closed at the end."""
    engines = []

    def make(**overrides) -> Engine:
        engines.append(Engine.open(Settings(data_dir=data_dir, device="cpu", **overrides), minilm))
        return engines[-1]

    yield make
    for e in engines:
        e.close()
