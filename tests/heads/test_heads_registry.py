"""Registry: versions, aliases, tenant isolation, concurrent writers, parent checks, delete.

(Named test_heads_registry so that, without __init__.py files, its module name cannot clash
with another package's test_registry — a spawned worker imports it by that name.)
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from headfleet.errors import NotFoundError, ParentMismatchError, ValidationError
from headfleet.heads import HeadArrays, Registry

FP = "a1b2c3d4e5f6" + "0" * 52
OTHER_FP = "ffeeddccbbaa" + "1" * 52


@pytest.fixture
def head(make_clusters) -> HeadArrays:
    X, y = make_clusters({"ham": 10, "spam": 10})
    return HeadArrays.from_sklearn(LogisticRegression().fit(X, y))


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "data")


def _manifest(**extra) -> dict:
    return {"parent_fingerprint": FP, "tokenizer_hash": "tok123", "training_data_hash": "d" * 64,
            "metrics": {"accuracy": np.float64(0.97)}, **extra}


def test_save_load_round_trip(reg, head, make_clusters):
    saved = reg.save("acme", "spam", head, _manifest(git_commit="abc123"))
    assert saved["id"] == "spam@1" and saved["version"] == 1 and saved["tenant"] == "acme"
    assert saved["type"] == "logreg" and saved["labels"] == ["ham", "spam"] and saved["multi_label"] is False
    assert saved["created_at"].endswith("+00:00") and saved["git_commit"] == "abc123"
    manifest, back = reg.load("acme", "spam", expected_fingerprint=FP)
    assert manifest == saved and manifest["metrics"]["accuracy"] == 0.97
    assert back == head
    X, _ = make_clusters({"q": 9}, salt=5)
    assert np.array_equal(back.predict_proba(X), head.predict_proba(X))
    files = sorted(p.name for p in (reg.root / "acme" / "spam" / "versions" / "1").iterdir())
    assert files == ["manifest.json", "weights.safetensors"]


def test_versions_increment_and_are_immutable(reg, head):
    first = reg.save("acme", "spam", head, _manifest())
    v1 = reg.root / "acme" / "spam" / "versions" / "1"
    before = {p.name: p.read_bytes() for p in v1.iterdir()}
    other = HeadArrays("logreg", ["x", "y", "z"], False, np.ones((3, 384)), np.zeros(3))
    second = reg.save("acme", "spam", other, _manifest())
    assert (first["version"], second["version"]) == (1, 2)
    assert reg.versions("acme", "spam") == [1, 2]
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == before
    assert reg.load("acme", "spam@1")[1] == head and reg.load("acme", "spam")[1] == other


def test_aliases(reg, head):
    for _ in range(2):
        reg.save("acme", "spam", head, _manifest())
    assert reg.aliases("acme", "spam") == {"latest": 2}
    reg.set_alias("acme", "spam", "prod", 1)
    reg.save("acme", "spam", head, _manifest())
    assert reg.aliases("acme", "spam") == {"latest": 3, "prod": 1}  # latest follows saves, prod stays
    assert reg.resolve("acme", "spam")["version"] == 3
    assert reg.resolve("acme", "spam@latest")["version"] == 3
    assert reg.resolve("acme", "spam@prod")["version"] == 1
    assert reg.resolve("acme", "spam@1")["id"] == "spam@1"
    with pytest.raises(NotFoundError):
        reg.set_alias("acme", "spam", "prod", 9)
    with pytest.raises(ValidationError):
        reg.set_alias("acme", "spam", "1", 1)
    with pytest.raises(ValidationError):
        reg.set_alias("acme", "spam", "Prod", 1)


def test_unknown_refs_are_not_found(reg, head):
    reg.save("acme", "spam", head, _manifest())
    for ref, pattern in [("nothing", "no classifier named 'nothing'"), ("spam@7", "no version 7"),
                         ("spam@staging", "no alias 'staging'")]:
        with pytest.raises(NotFoundError, match=pattern):
            reg.resolve("acme", ref)
    with pytest.raises(NotFoundError):
        reg.versions("acme", "nothing")


def test_other_tenants_classifier_looks_exactly_missing(reg, head):
    reg.save("tenant-a", "secret", head, _manifest())
    with pytest.raises(NotFoundError) as theirs:
        reg.resolve("tenant-b", "secret")
    with pytest.raises(NotFoundError) as missing:
        reg.resolve("tenant-a", "secret-typo")
    assert theirs.value.message == missing.value.message.replace("secret-typo", "secret")
    assert "tenant-a" not in theirs.value.message
    with pytest.raises(NotFoundError) as via_load:
        reg.load("tenant-b", "secret@1")
    assert via_load.value.message == theirs.value.message
    assert reg.list("tenant-b") == []


def test_list(reg, head):
    reg.save("acme", "spam", head, _manifest())
    reg.save("acme", "spam", head, _manifest())
    reg.save("acme", "topic", head, _manifest())
    reg.set_alias("acme", "spam", "prod", 1)
    listed = {c["name"]: c for c in reg.list("acme")}
    assert set(listed) == {"spam", "topic"}
    assert listed["spam"]["latest"] == 2 and listed["spam"]["versions"] == [1, 2]
    assert listed["spam"]["aliases"] == {"latest": 2, "prod": 1}
    assert listed["spam"]["labels"] == ["ham", "spam"] and listed["spam"]["type"] == "logreg"


def test_list_says_which_classifiers_read_a_lora_adapter(reg, head):
    """A LoRA classifier's head is a logreg like any other; the listing must still show its adapter
    (what ``GET /classifiers`` and ``headfleet classifiers list`` print), and say None for a plain head."""
    adapter = {"format": "peft-lora", "source": "trained", "rank": 8, "alpha": 16.0, "use_rslora": False,
               "scale": 2.0, "targets": ["query", "value"], "sha256": "e" * 64, "bytes": 300_000,
               "train_config": {"epochs": 5}, "seconds": 12.5}
    reg.save("acme", "plain", head, _manifest())
    reg.save("acme", "tuned", head, _manifest(adapter=adapter))
    listed = {c["name"]: c for c in reg.list("acme")}
    assert listed["plain"]["adapter"] is None and listed["plain"]["type"] == "logreg"
    assert listed["tuned"]["type"] == "logreg"  # the head's kind, unchanged in meaning
    assert listed["tuned"]["adapter"] == {"format": "peft-lora", "source": "trained", "rank": 8, "alpha": 16.0,
                                          "targets": ["query", "value"]}
    reg.save("acme", "tuned", head, _manifest())  # the latest version is a plain head again: so says the listing
    assert {c["name"]: c for c in reg.list("acme")}["tuned"]["adapter"] is None


def test_parent_mismatch_is_refused(reg, head):
    reg.save("acme", "spam", head, _manifest())
    with pytest.raises(ParentMismatchError) as e:
        reg.load("acme", "spam", expected_fingerprint=OTHER_FP)
    assert FP[:12] in e.value.message and OTHER_FP[:12] in e.value.message and "retrain" in e.value.message
    assert reg.load("acme", "spam", expected_fingerprint=None)[1] == head


def test_delete(reg, head):
    reg.save("acme", "spam", head, _manifest())
    reg.save("acme", "keep", head, _manifest())
    reg.delete("acme", "spam")
    with pytest.raises(NotFoundError):
        reg.resolve("acme", "spam")
    with pytest.raises(NotFoundError):
        reg.delete("acme", "spam")
    assert [c["name"] for c in reg.list("acme")] == ["keep"]
    assert sorted(p.name for p in (reg.root / "acme").iterdir()) == ["keep"]  # trash is gone too
    assert reg.save("acme", "spam", head, _manifest())["version"] == 1  # a new classifier starts over


@pytest.mark.parametrize("tenant, ref", [("Acme", "spam"), ("acme", "../etc"), ("acme", ".hidden"),
                                         ("a/b", "spam"), ("acme", "x" * 65), ("acme", "spam@0"),
                                         ("acme", "spam@Prod"), ("", "spam")])
def test_invalid_names_are_refused(reg, tenant, ref):
    with pytest.raises(ValidationError):
        reg.resolve(tenant, ref)


def test_invalid_names_are_refused_on_save(reg, head):
    for tenant, name in [("acme", "Spam"), ("acme", "a b"), ("../x", "spam"), ("acme", "spam@2")]:
        with pytest.raises(ValidationError):
            reg.save(tenant, name, head, {})


def _save_worker(root: str, barrier, results, seed: int) -> None:
    """Runs in its own process: wait for all writers, then save the same classifier."""
    rng = np.random.default_rng(seed)
    head = HeadArrays("logreg", ["a", "b"], False, rng.normal(size=(2, 384)), np.array([0.0, float(seed)]))
    barrier.wait()
    results.put(Registry(Path(root)).save("acme", "race", head, {"writer": seed})["version"])


def test_concurrent_writers_get_distinct_versions(tmp_path):
    """8 processes released together; fork keeps start-up cheap (spawn where fork is absent)."""
    root = tmp_path / "data"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_save_worker, args=(str(root), barrier, results, s)) for s in range(8)]
    for p in procs:
        p.start()
    versions = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(versions) == list(range(1, 9))
    reg = Registry(root)
    assert reg.versions("acme", "race") == list(range(1, 9))
    assert reg.aliases("acme", "race") == {"latest": 8}
    writers = set()
    for v in range(1, 9):
        manifest, head = reg.load("acme", f"race@{v}")
        assert manifest["version"] == v and head.b1[1] == manifest["writer"]
        writers.add(manifest["writer"])
    assert writers == set(range(8))
    cdir = root / "acme" / "race"
    leftovers = [p.name for p in cdir.iterdir() if p.name.startswith(".") and p.name != ".aliases.lock"]
    assert leftovers == []
    assert json.loads((cdir / "aliases.json").read_text()) == {"latest": 8}


# --- integrity: what was published is what is served ---------------------------------------------
def test_a_weights_file_changed_after_publishing_is_refused_by_name(reg, head):
    from headfleet.errors import CorruptVersionError

    m = reg.save("acme", "spam", head, _manifest())
    path = reg.version_dir("acme", m) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0x5A for b in data[-4:])  # same length, other weights
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError) as e:
        reg.load("acme", "spam", FP)
    assert "acme/spam@1" in e.value.message and "sha256" in e.value.message and "retrain" in e.value.message
    assert str(reg.root) not in e.value.message
    path.write_bytes(path.read_bytes()[:40])  # truncated: still refused by name, never a SafetensorError
    with pytest.raises(CorruptVersionError, match="acme/spam@1"):
        reg.load("acme", "spam", FP)


def test_an_unreadable_manifest_is_a_corrupt_version_not_a_crash(reg, head):
    from headfleet.errors import CorruptVersionError

    m = reg.save("acme", "spam", head, _manifest())
    (reg.version_dir("acme", m) / "manifest.json").write_text('{"id": "spam@1", "vers')
    with pytest.raises(CorruptVersionError, match="acme/spam@1 is corrupt: its manifest cannot be read"):
        reg.resolve("acme", "spam@1")


# --- leftovers of crashed writers ------------------------------------------------------------------
def test_sweep_removes_what_dead_writers_left_and_keeps_a_live_writers_dir(reg, head):
    import fcntl
    import os

    reg.save("acme", "spam", head, _manifest())
    cdir = reg.root / "acme" / "spam"
    dead = cdir / ".tmp-dead"
    dead.mkdir()
    (dead / "weights.safetensors").write_bytes(b"half")
    live = cdir / ".tmp-live"
    live.mkdir()
    trash = reg.root / "acme" / ".trash-spam-0123"
    (trash / "versions").mkdir(parents=True)
    alias_tmp = cdir / ".aliases.json.abc123.tmp"
    alias_tmp.write_text("{")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer in another process, still saving
    try:
        assert reg.sweep(min_age_s=0) == 3
    finally:
        os.close(fd)
    assert not dead.exists() and not trash.exists() and not alias_tmp.exists() and live.exists()
    assert reg.load("acme", "spam", FP)[0]["version"] == 1
    assert reg.sweep(min_age_s=0) == 1 and not live.exists()  # its writer is gone now
