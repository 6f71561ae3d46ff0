"""The local FAISS store across processes and crashes: real files, real SIGKILL, no mocks.

Each child is ``faiss_store_child.py`` (a real process with its own FaissStore on the folder);
the test talks to it one line at a time, so "killed after its flush" is an event, not a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from cache_helpers import DIM, FP, keys_for, unit_vectors

from headfleet.cache import FaissStore

CHILD = Path(__file__).with_name("faiss_store_child.py")


class Child:
    """One ``faiss_store_child.py`` process; ``ask`` sends a command and returns its reply line."""

    def __init__(self, path: Path, *, interval: float, tag: str, n: int, batch: int, seed: int):
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), str(interval), tag, str(n), str(batch), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=CHILD.parent,
        )

    def read(self) -> list[str]:
        line = self.proc.stdout.readline()
        assert line, f"child exited with {self.proc.wait(timeout=30)}"
        return line.split()

    def ask(self, command: str) -> list[str]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self) -> None:
        assert self.ask("close") == ["closed"]
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def children():
    made: list[Child] = []

    def spawn(*args, **kwargs) -> Child:
        made.append(Child(*args, **kwargs))
        return made[-1]

    yield spawn
    for child in made:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(timeout=30)


def assert_holds(store: FaissStore, keys: list[bytes], vecs: np.ndarray) -> None:
    got = store.get_many(keys)
    assert all(g is not None for g in got), f"{sum(g is None for g in got)} of {len(keys)} missing"
    np.testing.assert_array_equal(np.stack(got), vecs)


def assert_lacks(store: FaissStore, keys: list[bytes]) -> None:
    assert store.get_many(keys) == [None] * len(keys)


# -- (1) kill -9 loses at most what was still queued --------------------------------------------


def test_sigkill_after_the_flush_window_loses_nothing(tmp_path: Path, children) -> None:
    path = tmp_path / "local.faiss.npz"
    n = 600
    child = children(path, interval=0.2, tag="killed", n=n, batch=50, seed=1)
    assert child.read()[0] == "ready"
    assert child.ask("wait-flushed")[0] == "flushed"  # the background flusher committed everything
    child.kill9()
    fresh = FaissStore(DIM, FP, path)
    assert len(fresh) == n
    assert_holds(fresh, keys_for(n, "killed", "killed"), unit_vectors(n, 1))


def test_sigkill_loses_exactly_the_queued_puts(tmp_path: Path, children) -> None:
    path = tmp_path / "local.faiss.npz"
    child = children(path, interval=3600, tag="committed", n=40, batch=40, seed=1)
    assert child.read()[0] == "ready"
    assert child.ask("flush")[0] == "flushed"
    assert child.ask("put queued 30 2") == ["put"]  # an hour's window: still queued at the kill
    child.kill9()
    fresh = FaissStore(DIM, FP, path)
    assert_holds(fresh, keys_for(40, "committed", "committed"), unit_vectors(40, 1))
    assert_lacks(fresh, keys_for(30, "queued", "queued"))


# -- (2) two processes, one folder: nobody erases anybody -----------------------------------------


def test_two_processes_writing_at_once_keep_the_union(tmp_path: Path, children) -> None:
    path = tmp_path / "local.faiss.npz"
    # both open the folder first; alpha commits every batch inside put, beta through its flusher
    a = children(path, interval=0, tag="alpha", n=0, batch=1, seed=1)
    b = children(path, interval=0.05, tag="beta", n=0, batch=1, seed=2)
    assert a.read()[0] == "ready" and b.read()[0] == "ready"
    # at once: both write batches of 10 without waiting for each other
    for child, command in ((a, "put alpha 300 1 10"), (b, "put beta 200 2 10")):
        child.proc.stdin.write(command + "\n")
        child.proc.stdin.flush()
    assert a.read() == ["put"] and b.read() == ["put"]
    # in turns: each commit lands after one of the other's, which it must not erase
    for turn in range(4):
        assert a.ask(f"put a{turn} 10 {10 + turn}") == ["put"]
        assert b.ask(f"put b{turn} 10 {20 + turn}") == ["put"]
        assert b.ask("wait-flushed")[0] == "flushed"
    # each sees the other's rows at its next miss, while both are running
    assert b.ask("count alpha 300") == ["count", "300"]
    assert a.ask("count beta 200") == ["count", "200"]
    assert a.ask("count b3 10") == ["count", "10"]
    a.finish()
    b.finish()
    fresh = FaissStore(DIM, FP, path)
    assert len(fresh) == 580
    assert_holds(fresh, keys_for(300, "alpha", "alpha"), unit_vectors(300, 1))
    assert_holds(fresh, keys_for(200, "beta", "beta"), unit_vectors(200, 2))
    for turn in range(4):
        assert_holds(fresh, keys_for(10, f"a{turn}", f"a{turn}"), unit_vectors(10, 10 + turn))
        assert_holds(fresh, keys_for(10, f"b{turn}", f"b{turn}"), unit_vectors(10, 20 + turn))


def test_a_cli_closing_beside_a_killed_server_erases_nothing(tmp_path: Path, children) -> None:
    path = tmp_path / "local.faiss.npz"
    server = children(path, interval=0.05, tag="server", n=100, batch=25, seed=1)
    assert server.read()[0] == "ready"
    cli = children(path, interval=0.05, tag="cli", n=50, batch=50, seed=2)
    assert cli.read()[0] == "ready"
    cli.finish()  # the old format rewrote the whole file here, without the server's vectors
    assert server.ask("put late 20 3") == ["put"]
    assert server.ask("wait-flushed")[0] == "flushed"
    server.kill9()
    fresh = FaissStore(DIM, FP, path)
    assert len(fresh) == 170
    assert_holds(fresh, keys_for(100, "server", "server"), unit_vectors(100, 1))
    assert_holds(fresh, keys_for(50, "cli", "cli"), unit_vectors(50, 2))
    assert_holds(fresh, keys_for(20, "late", "late"), unit_vectors(20, 3))


# -- (4) a torn or garbage tail is ignored, the rest intact ----------------------------------------


@pytest.mark.parametrize("damage", ["cut inside the last batch", "garbage after the last batch",
                                    "garbage inside the last batch"])
def test_damaged_tail_after_sigkill_keeps_every_whole_batch(tmp_path: Path, children, damage: str) -> None:
    path = tmp_path / "local.faiss.npz"
    child = children(path, interval=0, tag="first", n=60, batch=60, seed=1)
    first = int(child.read()[1])  # WAL bytes once the first batch is committed
    assert child.ask("put second 60 2") == ["put"]
    end = int(child.ask("flush")[1])
    child.kill9()
    wal = path.with_suffix(".sqlite-wal")
    assert end > first > 0 and wal.stat().st_size == end
    rng = np.random.default_rng(7)
    if damage == "cut inside the last batch":
        os.truncate(wal, first + (end - first) // 2)
    elif damage == "garbage after the last batch":
        with open(wal, "ab") as f:
            f.write(rng.bytes(9000))
    else:
        with open(wal, "r+b") as f:
            f.seek(first + (end - first) // 2)
            f.write(rng.bytes(64))

    fresh = FaissStore(DIM, FP, path)
    assert fresh.discarded_on_load == 0 and fresh.read_errors == 0
    assert_holds(fresh, keys_for(60, "first", "first"), unit_vectors(60, 1))
    if damage == "garbage after the last batch":
        assert_holds(fresh, keys_for(60, "second", "second"), unit_vectors(60, 2))
    else:  # the cut batch is dropped whole, never half loaded
        assert_lacks(fresh, keys_for(60, "second", "second"))
    assert len(fresh) == (120 if damage == "garbage after the last batch" else 60)


def test_malformed_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "local.faiss.npz"
    keys, vecs = keys_for(5), unit_vectors(5)
    store = FaissStore(DIM, FP, path)
    store.put_many(keys, vecs, ["ns"] * 5)
    store.close()
    bad_key = keys_for(2, tag="bad")
    with sqlite3.connect(path.with_suffix(".sqlite")) as db:
        db.execute("INSERT INTO entries(fid, key, namespace, vector) VALUES (?, ?, ?, ?)",
                   (int.from_bytes(bad_key[0][:8], "little", signed=True), bad_key[0], "ns", b"\0" * 10))
        db.execute("INSERT INTO entries(fid, key, namespace, vector) VALUES (?, ?, ?, ?)",
                   (12345, bad_key[1], "ns", vecs[0].tobytes()))  # the id is not this key's
    fresh = FaissStore(DIM, FP, path)
    assert fresh.skipped_rows == 2 and len(fresh) == 5
    assert_holds(fresh, keys, vecs)
    assert_lacks(fresh, bad_key)


# -- (3) the format-1 snapshot is read and migrated ------------------------------------------------


def write_format1(path: Path, keys: list[bytes], vecs: np.ndarray, namespaces: list[str],
                  dim: int = DIM, fingerprint: str = FP) -> None:
    """A store file exactly as the format-1 ``write_snapshot`` wrote it (one ``.npz``)."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    ids = np.asarray([int.from_bytes(k[:8], "little", signed=True) for k in keys], dtype=np.int64)
    index.add_with_ids(vecs, ids)
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps({"format": 1, "dim": dim, "fingerprint": fingerprint})),
                 index=faiss.serialize_index(index), ids=ids,
                 keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16),
                 namespaces=np.asarray(namespaces, dtype=str))


def test_format1_file_is_migrated_then_removed(tmp_path: Path) -> None:
    path = tmp_path / "local-0123456789abcdef.faiss.npz"  # the name Engine.open gives it
    keys_a, keys_b = keys_for(30, "a"), keys_for(10, "b")
    vecs = unit_vectors(40)
    write_format1(path, keys_a + keys_b, vecs, ["a"] * 30 + ["b"] * 10)

    store = FaissStore(DIM, FP, path)
    assert store.migrated_on_load == 40 and store.discarded_on_load == 0
    assert_holds(store, keys_a + keys_b, vecs)
    assert {k for k, _ in store.search(vecs[35], k=40, namespace="b")} == set(keys_b)
    assert not path.exists() and path.with_suffix(".sqlite").exists()
    store.close()

    again = FaissStore(DIM, FP, path)  # from the new file alone
    assert again.migrated_on_load == 0
    assert_holds(again, keys_a + keys_b, vecs)
    assert [k for k, _ in again.search(vecs[35], k=1, namespace="b")] == [keys_b[5]]


def test_migration_keeps_newer_rows_already_in_the_store(tmp_path: Path) -> None:
    path = tmp_path / "local.faiss.npz"
    keys = keys_for(4)
    old, new = unit_vectors(4, seed=1), unit_vectors(4, seed=2)
    store = FaissStore(DIM, FP, path)
    store.put_many(keys[:2], new[:2], ["ns"] * 2)
    store.close()
    write_format1(path, keys, old, ["ns"] * 4)  # e.g. an old binary saved after the upgrade
    migrated = FaissStore(DIM, FP, path)
    assert_holds(migrated, keys, np.concatenate([new[:2], old[2:]]))


def test_format1_file_of_another_backbone_is_moved_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "local.faiss.npz"
    write_format1(path, keys_for(3), unit_vectors(3), ["ns"] * 3, fingerprint="another-backbone")
    with caplog.at_level("WARNING", logger="headfleet.cache.faiss_file"):
        store = FaissStore(DIM, FP, path)
    assert len(store) == 0 and store.discarded_on_load == 1
    assert "ignoring FAISS store snapshot" in caplog.text
    assert not path.exists() and len(list(tmp_path.glob("local.faiss.discarded-*.npz"))) == 1  # kept
    assert FaissStore(DIM, FP, path).discarded_on_load == 0  # and not counted at every start
