"""The frozen backbone: sentence-transformers parity, truncation reporting, fingerprints."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from headfleet.embedder import Embedder, PoolingConfig, fingerprint

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Quarterly revenue grew by 12% compared to last year.",
    "Can you reset my password? I cannot log in since this morning.",
    "Le chat est sur la table.",
    "I'd like to cancel my subscription, effective immediately!!!",
    "x",
    "Über die Brücke gehen wir morgen früh um acht.",
]


@pytest.fixture(scope="module")
def sentence_transformer(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.folder), device="cpu")


def _real_texts(sms_spam_path, n=256):
    with open(sms_spam_path, newline="", encoding="utf-8") as f:
        return SENTENCES + [row["text"] for _, row in zip(range(n), csv.DictReader(f))]


def test_embeddings_match_sentence_transformers(minilm, sentence_transformer, sms_spam_path):
    texts = _real_texts(sms_spam_path)
    ours = minilm.embed(texts).vectors
    theirs = sentence_transformer.encode(texts, batch_size=32, convert_to_numpy=True)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_order_is_kept_whatever_the_length_sorting(minilm):
    together = minilm.embed(SENTENCES).vectors
    alone = np.stack([minilm.embed([t]).vectors[0] for t in SENTENCES])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_truncation_is_reported_per_text_and_matches_sentence_transformers(minilm, sentence_transformer):
    long_text = "The contract renewal terms are attached for review. " * 60
    out = minilm.embed(["short text", long_text])
    assert out.truncated.tolist() == [False, True]
    assert out.n_tokens[1] > minilm.max_length
    assert out.truncated_count == 1
    theirs = sentence_transformer.encode([long_text], convert_to_numpy=True)[0]
    assert float(out.vectors[1] @ theirs) >= 0.9999


def test_token_counts_find_unknown_tokens(minilm):
    counts = minilm.count_tokens(["hello world", "\u2603\u2604 \u2605"])
    assert counts.n_unk[0] == 0
    assert counts.n_unk[1] >= 1


def test_empty_input_gives_an_empty_matrix(minilm):
    out = minilm.embed([])
    assert out.vectors.shape == (0, minilm.dim)


def test_fingerprint_names_the_backbone(minilm, tiny_model_dir, tmp_path):
    assert minilm.fingerprint == fingerprint(minilm.folder, minilm.pooling)
    tiny = Embedder.load(tiny_model_dir, max_length=64)
    assert tiny.fingerprint != minilm.fingerprint
    assert tiny.dim == 32 and tiny.embed(["hello"]).vectors.shape == (1, 32)
    # same weights, other pooling: other vectors, so another fingerprint
    copy = tmp_path / "cls-pooled"
    shutil.copytree(tiny_model_dir, copy)
    cfg = json.loads((copy / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    assert PoolingConfig.from_folder(copy).mode == "cls"
    assert fingerprint(copy, PoolingConfig.from_folder(copy)) != tiny.fingerprint
    # a different numeric backend is another fingerprint too
    assert fingerprint(tiny_model_dir, tiny.pooling, backend="onnx-int8") != tiny.fingerprint


def test_a_folder_without_a_model_is_refused_with_its_path(tmp_path):
    from headfleet.errors import BackendError

    with pytest.raises(BackendError, match=str(tmp_path)):
        Embedder.load(tmp_path)


def test_max_length_beyond_the_position_table_is_refused(tiny_model_dir):
    from headfleet.errors import BackendError

    with pytest.raises(BackendError, match="max_length"):
        Embedder.load(tiny_model_dir, max_length=4096)
