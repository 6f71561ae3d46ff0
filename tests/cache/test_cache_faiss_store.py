"""The local FAISS store: exact round trips, persistence, collisions, namespace isolation.

Crashes and several processes on one folder: ``test_cache_faiss_store_durable.py``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
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
    store = FaissStore(DIM, FP, path, flush_interval_s=3600)
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


def test_close_commits_the_queue_and_a_later_put_reopens(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path, flush_interval_s=3600)
    store.close()
    keys, vecs = keys_for(4), unit_vectors(4)
    store.put_many(keys[:2], vecs[:2], ["ns", "ns"])
    store.close()
    assert not store.dirty
    assert_rows(FaissStore(DIM, FP, path).get_many(keys[:2]), vecs[:2])
    store.put_many(keys[2:], vecs[2:], ["ns", "ns"])  # still usable after close
    store.close()
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def test_close_leaves_only_the_store_file_and_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path)
    keys, vecs = keys_for(4), unit_vectors(4)
    store.put_many(keys[:2], vecs[:2], ["ns"] * 2)
    store.flush()
    store.put_many(keys[2:], vecs[2:], ["ns"] * 2)
    store.close()  # the last connection folds the write-ahead log into the file and removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.sqlite", "store.sqlite.lock"]
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def wait_until(predicate, what: str, limit_s: float = 30.0) -> None:
    """Poll for an event the store's own thread brings about (a correctness wait, not a speed check)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def test_flusher_commits_without_being_asked(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path, flush_interval_s=0.05)
    keys, vecs = keys_for(30), unit_vectors(30)
    for i in range(0, 30, 10):
        store.put_many(keys[i:i + 10], vecs[i:i + 10], ["ns"] * 10)
    wait_until(lambda: not store.dirty, "the flusher committed the queue")
    other = FaissStore(DIM, FP, path)  # another store on the folder, as another process would open it
    assert_rows(other.get_many(keys), vecs)


def test_a_full_queue_is_committed_before_the_interval(tmp_path: Path) -> None:
    store = FaissStore(DIM, FP, tmp_path / "store.npz", flush_interval_s=3600, flush_rows=8)
    store.put_many(keys_for(8), unit_vectors(8), ["ns"] * 8)
    wait_until(lambda: not store.dirty, "eight queued rows woke the flusher")


def test_zero_interval_commits_inside_put(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path, flush_interval_s=0)
    keys, vecs = keys_for(3), unit_vectors(3)
    store.put_many(keys, vecs, ["ns"] * 3)
    assert not store.dirty
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def test_stores_on_one_folder_see_each_others_puts(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    a = FaissStore(DIM, FP, path, flush_interval_s=0)
    b = FaissStore(DIM, FP, path, flush_interval_s=0)
    keys_a, keys_b = keys_for(6, "a"), keys_for(4, "b")
    va, vb = unit_vectors(6, seed=1), unit_vectors(4, seed=2)
    a.put_many(keys_a, va, ["a"] * 6)
    b.put_many(keys_b, vb, ["b"] * 4)
    assert_rows(a.get_many(keys_b), vb)  # a miss reads b's committed rows
    assert [k for k, _ in b.search(va[3], k=1, namespace="a")] == [keys_a[3]]  # search reads them too
    assert len(a) == len(b) == 10
    assert a.refresh() == 0  # its own rows are not loaded a second time


def test_a_queued_put_wins_over_an_older_row_of_another_store(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    slow = FaissStore(DIM, FP, path, flush_interval_s=3600)
    quick = FaissStore(DIM, FP, path, flush_interval_s=0)
    key = keys_for(1)
    old, new = unit_vectors(1, seed=1), unit_vectors(1, seed=2)
    quick.put_many(key, old, ["ns"])
    slow.put_many(key, new, ["ns"])  # queued, later than quick's committed row
    slow.refresh()
    np.testing.assert_array_equal(slow.get_many(key)[0], new[0])
    slow.flush()
    quick.refresh()
    np.testing.assert_array_equal(quick.get_many(key)[0], new[0])
    np.testing.assert_array_equal(FaissStore(DIM, FP, path).get_many(key)[0], new[0])


def test_a_failed_commit_keeps_the_rows_queued(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path, flush_interval_s=3600, busy_timeout_s=0.05)
    keys, vecs = keys_for(3), unit_vectors(3)
    store.put_many(keys, vecs, ["ns"] * 3)
    holder = sqlite3.connect(path.with_suffix(".sqlite"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the timeout
    with pytest.raises(sqlite3.OperationalError):
        store.flush()
    assert store.dirty
    assert_rows(store.get_many(keys), vecs)  # still served from memory
    holder.execute("ROLLBACK")
    holder.close()
    assert store.flush() == 3 and not store.dirty
    assert_rows(FaissStore(DIM, FP, path).get_many(keys), vecs)


def test_an_unusable_folder_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(OSError):
        FaissStore(DIM, FP, tmp_path / "not-a-folder" / "store.npz")


@pytest.mark.parametrize("dim, fp", [(DIM, "another-backbone"), (DIM * 2, FP)])
def test_file_from_another_backbone_is_moved_aside(tmp_path: Path, caplog, dim: int, fp: str) -> None:
    path = tmp_path / "store.npz"
    store = FaissStore(DIM, FP, path)
    keys, vecs = keys_for(3), unit_vectors(3)
    store.put_many(keys, vecs, ["ns"] * 3)
    store.close()
    with caplog.at_level(logging.WARNING, logger="headfleet.cache.faiss_file"):
        other = FaissStore(dim, fp, path)
    assert len(other) == 0 and other.discarded_on_load == 1
    assert "ignoring local store" in caplog.text
    other.close()
    (aside,) = tmp_path.glob("store.discarded-*.sqlite")
    # the other backbone's vectors are kept, not erased: open the moved file as a store
    assert_rows(FaissStore(DIM, FP, aside).get_many(keys), vecs)


@pytest.mark.parametrize("which", ["store.npz", "store.sqlite"])
@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04truncated",
                                     b"SQLite format 3\x00" + b"\xff" * 200])
def test_unreadable_file_starts_empty(tmp_path: Path, which: str, content: bytes) -> None:
    path = tmp_path / "store.npz"
    (tmp_path / which).write_bytes(content)
    store = FaissStore(DIM, FP, path)
    # an empty file is an empty SQLite database: nothing to discard
    assert len(store) == 0 and store.discarded_on_load == (0 if which == "store.sqlite" and not content else 1)
    # and the store is usable, and the bad file does not come back
    keys, vecs = keys_for(1), unit_vectors(1)
    store.put_many(keys, vecs, ["ns"])
    store.close()
    again = FaissStore(DIM, FP, path)
    assert again.discarded_on_load == 0
    assert_rows(again.get_many(keys), vecs)


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


def test_loading_faiss_logs_no_missing_module_at_the_service_s_log_level():
    """faiss' loader logged two ModuleNotFoundError lines at INFO on every start (its AVX builds it
    does not ship), which read like failures in the service's log."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); "
                           "import headfleet.cache; print(headfleet.cache.FaissStore.__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "FaissStore", done.stderr[-2000:]
    assert "ModuleNotFoundError" not in done.stderr and "Could not load library" not in done.stderr, done.stderr
