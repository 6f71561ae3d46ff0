"""The local FAISS store: exact round trips, safe persistence, collisions, namespace isolation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import DIM, FP, keys_for, unit_vectors

from headfleet.cache import FaissStore


def assert_rows(got: list, want: np.ndarray) -> None:
    assert all(g is not None for g in got)
    np.testing.assert_array_equal(np.stack(got), want)


def test_put_get_round_trip_is_exact() -> None:
    store = FaissStore(DIM, FP)
    keys, vecs = keys_for(20), unit_vectors(20)
    store.put_many(keys, vecs, ["ns"] * 20)
    assert len(store) == 20
    assert_rows(store.get_many(keys), vecs)
    assert store.get_many(keys_for(2, tag="never stored")) == [None, None]


def test_reput_replaces_vector() -> None:
    store = FaissStore(DIM, FP)
    keys = keys_for(3)
    store.put_many(keys, unit_vectors(3, seed=1), ["ns"] * 3)
    new = unit_vectors(1, seed=2)
    store.put_many(keys[1:2], new, ["ns"])
    assert len(store) == 3
    np.testing.assert_array_equal(store.get_many(keys[1:2])[0], new[0])


def test_duplicate_key_in_one_batch_last_wins() -> None:
    store = FaissStore(DIM, FP)
    key = keys_for(1)[0]
    vecs = unit_vectors(2)
    store.put_many([key, key], vecs, ["ns", "ns"])
    assert len(store) == 1
    np.testing.assert_array_equal(store.get_many([key])[0], vecs[1])


def test_save_and_reload_gives_same_vectors(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path)
    keys_a, keys_b = keys_for(10, "a"), keys_for(5, "b")
    vecs = unit_vectors(15)
    store.put_many(keys_a + keys_b, vecs, ["a"] * 10 + ["b"] * 5)
    assert store.dirty
    store.save()
    assert not store.dirty

    again = FaissStore(DIM, FP, path)
    assert again.discarded_on_load == 0 and not again.dirty
    assert_rows(again.get_many(keys_a + keys_b), vecs)
    # namespaces survive the reload: search in "b" returns only b's keys
    found = again.search(vecs[12], k=15, namespace="b")
    assert {k for k, _ in found} == set(keys_b)
    assert found[0][0] == keys_b[2]


def test_close_saves_only_when_dirty(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path)
    store.close()
    assert not path.exists()  # nothing put: nothing written
    keys, vecs = keys_for(2), unit_vectors(2)
    store.put_many(keys, vecs, ["ns", "ns"])
    store.close()
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def test_save_leaves_no_temp_files_and_replaces_previous(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path)
    keys, vecs = keys_for(4), unit_vectors(4)
    store.put_many(keys[:2], vecs[:2], ["ns"] * 2)
    store.save()
    store.put_many(keys[2:], vecs[2:], ["ns"] * 2)
    store.save()
    assert [p.name for p in tmp_path.iterdir()] == ["store.npz"]
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def test_failed_save_cleans_up_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "store.npz"
    target.mkdir()  # the final rename onto a directory fails after the temp file is written
    store = FaissStore(DIM, FP, target)
    store.put_many(keys_for(1), unit_vectors(1), ["ns"])
    with pytest.raises(OSError):
        store.save()
    assert [p.name for p in tmp_path.iterdir()] == ["store.npz"]
    assert store.dirty  # the data was not persisted, so it is still owed to disk


@pytest.mark.parametrize("dim, fp", [(DIM, "another-backbone"), (DIM * 2, FP)])
def test_file_from_another_backbone_is_ignored(tmp_path: Path, caplog, dim: int, fp: str) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path)
    store.put_many(keys_for(3), unit_vectors(3), ["ns"] * 3)
    store.save()
    with caplog.at_level(logging.WARNING, logger="headfleet.cache.faiss_store"):
        other = FaissStore(dim, fp, path)
    assert len(other) == 0 and other.discarded_on_load == 1
    assert "ignoring FAISS store" in caplog.text


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04truncated"])
def test_unreadable_file_starts_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "store.npz"
    path.write_bytes(content)
    store = FaissStore(DIM, FP, path)
    assert len(store) == 0 and store.discarded_on_load == 1
    # and the store is usable, and its next save replaces the bad file
    keys, vecs = keys_for(1), unit_vectors(1)
    store.put_many(keys, vecs, ["ns"])
    store.save()
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def forged_pair() -> tuple[bytes, bytes]:
    """Two 16-byte keys with the same first 8 bytes, i.e. the same faiss id."""
    return b"\x01" * 8 + b"A" * 8, b"\x01" * 8 + b"B" * 8


def test_64bit_collision_is_a_miss_not_a_wrong_vector() -> None:
    store = FaissStore(DIM, FP)
    a, b = forged_pair()
    va, vb = unit_vectors(2)
    store.put_many([a], va[None], ["ns"])
    assert store.get_many([b]) == [None]
    np.testing.assert_array_equal(store.get_many([a])[0], va)

    store.put_many([b], vb[None], ["ns"])  # b displaces a (one slot per id), counted
    assert store.collisions == 1 and len(store) == 1
    assert store.get_many([a]) == [None]
    np.testing.assert_array_equal(store.get_many([b])[0], vb)


def test_search_never_returns_another_namespace() -> None:
    store = FaissStore(DIM, FP)
    mine, theirs = keys_for(5, "mine"), keys_for(50, "theirs")
    vm, vt = unit_vectors(5, seed=1), unit_vectors(50, seed=2)
    store.put_many(mine + theirs, np.concatenate([vm, vt]), ["mine"] * 5 + ["theirs"] * 50)

    query = vt[7]  # an exact match exists, but in the other namespace
    found = store.search(query, k=10, namespace="mine")
    assert {k for k, _ in found} == set(mine)
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)
    assert store.search(query, k=1, namespace="theirs")[0][0] == theirs[7]
    assert store.search(query, k=3, namespace="nobody") == []


def test_reput_moves_key_between_namespaces() -> None:
    store = FaissStore(DIM, FP)
    key = keys_for(1)[0]
    vec = unit_vectors(1)
    store.put_many([key], vec, ["old"])
    store.put_many([key], vec, ["new"])
    assert store.search(vec[0], k=5, namespace="old") == []
    assert [k for k, _ in store.search(vec[0], k=5, namespace="new")] == [key]
