"""Training data stored with each version: exact round trip, damage detected, stale versions listed."""

from __future__ import annotations

import gzip

import pytest

from headfleet.errors import NotFoundError, TrainingDataError
from headfleet.heads import Examples, Registry, examples_from_records, train_head
from headfleet.heads.data import TRAINING_DATA_FILE, examples_from_bytes, examples_to_bytes
from headfleet.heads.retrain import mark_stale, needs_retrain, stale_versions, stored_examples, training_data_files

OLD, NEW = "a" * 64, "b" * 64  # two backbone fingerprints: before and after a backend switch

AWKWARD = [
    "plain text",
    'quotes " and \\ backslashes, a tab\tand a\nnewline',
    "unicode: naïve café 東京 🚀",
    "a line separator \u2028 and a paragraph separator \u2029 inside one text",
    "",  # kept as is: refusing it is validate()'s job, not the file's
]


def test_single_label_round_trip_is_exact_and_deterministic():
    ex = Examples(AWKWARD, ["a", "b", "a", "b", "a"], multi_label=False)
    blob = examples_to_bytes(ex)
    back = examples_from_bytes(blob)
    assert back.texts == ex.texts and back.labels == ex.labels and back.multi_label is False
    assert back.source_hash == ex.source_hash  # the manifest's training_data_hash still names it
    assert examples_to_bytes(back) == blob  # same data, same bytes (no timestamp in the gzip header)


def test_multi_label_round_trip_keeps_label_sets_and_empty_sets():
    ex = examples_from_records([{"text": "x", "label": "b|a"}, {"text": "y", "label": []},
                                {"text": "z", "label": ["c"]}], multi_label=True)
    back = examples_from_bytes(examples_to_bytes(ex))
    assert back.labels == [["a", "b"], [], ["c"]] and back.multi_label is True
    assert back.source_hash == ex.source_hash


def test_damaged_or_altered_data_is_refused():
    ex = Examples(["one", "two", "three"], ["a", "b", "a"], multi_label=False)
    blob = examples_to_bytes(ex)
    with pytest.raises(TrainingDataError, match="unreadable"):
        examples_from_bytes(blob[: len(blob) // 2])
    text = gzip.decompress(blob).decode()
    altered = gzip.compress(text.replace('"two"', '"TWO"').encode())
    with pytest.raises(TrainingDataError, match="recorded hash"):
        examples_from_bytes(altered)
    dropped = gzip.compress("\n".join(text.splitlines()[:-1]).encode())
    with pytest.raises(TrainingDataError, match="holds 2 examples"):
        examples_from_bytes(dropped)


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


@pytest.fixture
def data_and_head(make_clusters):
    X, y = make_clusters({"ham": 20, "spam": 20})
    ex = Examples([f"text {i}" for i in range(len(y))], y, multi_label=False)
    return ex, train_head(X, ex, holdout=0).head


def _save(reg, tenant, name, head, ex, parent, with_data=True):
    files, entry = training_data_files(ex) if with_data else ({}, None)
    manifest = {"parent_fingerprint": parent, "training_data_hash": ex.source_hash, "metrics": {"seed": 7}}
    if with_data:
        manifest["training_data"] = entry
    return reg.save(tenant, name, head, manifest, files=files)


def test_stored_data_comes_back_from_the_registry(reg, data_and_head):
    ex, head = data_and_head
    m = _save(reg, "acme", "spam", head, ex, OLD)
    assert (reg.version_dir("acme", m) / TRAINING_DATA_FILE).is_file()
    back = stored_examples(reg, "acme", m)
    assert back.texts == ex.texts and back.labels == ex.labels
    legacy = _save(reg, "acme", "legacy", head, ex, OLD, with_data=False)
    assert stored_examples(reg, "acme", legacy) is None


def test_stale_versions_after_a_backbone_switch(reg, data_and_head):
    ex, head = data_and_head
    _save(reg, "acme", "spam", head, ex, OLD)  # v1
    _save(reg, "acme", "spam", head, ex, OLD)  # v2 = latest
    reg.set_alias("acme", "spam", "prod", 1)
    _save(reg, "acme", "legacy", head, ex, OLD, with_data=False)
    _save(reg, "acme", "fresh", head, ex, NEW)
    _save(reg, "globex", "spam", head, ex, OLD)

    stale = stale_versions(reg, "acme", NEW)
    assert [(s.name, s.version, s.aliases, s.has_data) for s in stale] == [
        ("legacy", 1, ["latest"], False), ("spam", 1, ["prod"], True), ("spam", 2, ["latest"], True)]
    assert stale[1].seed == 7 and stale[1].kind == head.kind
    assert stale_versions(reg, "acme", OLD, names=["fresh"])[0].version == 1
    assert stale_versions(reg, "acme", NEW, names=["fresh"]) == []  # trained on the loaded backbone
    with pytest.raises(NotFoundError):
        stale_versions(reg, "acme", NEW, names=["nope"])

    flags = {c["name"]: (c["needs_retrain"], c["stale_aliases"])
             for c in mark_stale(reg.list("acme"), needs_retrain(reg, "acme", NEW))}
    assert flags == {"fresh": (False, []), "legacy": (True, ["latest"]), "spam": (True, ["prod", "latest"])}
    assert reg.tenants() == ["acme", "globex"]
