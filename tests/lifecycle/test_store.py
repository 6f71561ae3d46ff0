"""The monitoring state store, on both backends: FileStore on a temp folder, RedisStore on a real
redis-server. Locks are checked across real processes (``python -c`` children)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import pytest
import redis

from headfleet.errors import BackendError, ValidationError
from headfleet.lifecycle.store import StateStore, check_key, make_key, open_store
from headfleet.lifecycle.store_file import FileStore
from headfleet.lifecycle.store_redis import RedisStore
from headfleet.settings import Settings

# A child process opening the same store. "count": wait for the go file, then 50 locked
# read-increment-writes (a pause between read and write makes a missing lock lose updates).
# "crash": take the lock and die holding it.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from headfleet.lifecycle.store_file import FileStore
from headfleet.lifecycle.store_redis import RedisStore
spec = json.loads(sys.argv[1])
if spec["kind"] == "file":
    store = FileStore(spec["root"])
else:
    store = RedisStore(spec["url"], spec["prefix"], lock_lease_s=spec["lease"])
mode = sys.argv[2]
if mode == "count":
    sync = Path(sys.argv[3])
    (sync / ("ready-" + sys.argv[4])).touch()
    deadline = time.monotonic() + 30
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    for _ in range(50):
        with store.lock("acme/spam/counter"):
            n = int(store.get("acme/spam/counter") or b"0")
            time.sleep(0.001)
            store.put("acme/spam/counter", str(n + 1).encode())
elif mode == "crash":
    with store.lock("acme/spam/counter"):
        os._exit(3)
"""


@dataclasses.dataclass
class Backend:
    kind: str
    spec: dict[str, Any]  # how a child process opens the same store
    open: Callable[..., StateStore]  # a new instance on the same store
    server: Any = None  # the RedisServer, for redis


@pytest.fixture(params=["file", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "file":
        root = tmp_path / "monitor"
        return Backend("file", {"kind": "file", "root": str(root)}, lambda **kw: FileStore(root))
    server = request.getfixturevalue("redis_server")

    def make(lock_lease_s: float = 30.0) -> StateStore:
        return RedisStore(server.url, "t", lock_lease_s=lock_lease_s)

    return Backend("redis", {"kind": "redis", "url": server.url, "prefix": "t", "lease": 30.0}, make, server)


@pytest.fixture
def store(backend):
    s = backend.open()
    yield s
    s.close()


def run_child(spec: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec), *args])


# -- values ----------------------------------------------------------------------------------


def test_round_trip(store):
    assert isinstance(store, StateStore)
    assert store.get("acme/spam/settings") is None
    store.put("acme/spam/settings", b'{"window": 500}')
    assert store.get("acme/spam/settings") == b'{"window": 500}'
    store.put("acme/spam/reservoir", bytes(range(256)) * 10)  # arbitrary bytes, NUL included
    assert store.get("acme/spam/reservoir") == bytes(range(256)) * 10
    store.put("acme/spam/empty", b"")
    assert store.get("acme/spam/empty") == b""
    store.put("acme/spam/settings", bytearray(b"v2"))
    assert store.get("acme/spam/settings") == b"v2"
    store.delete("acme/spam/settings")
    assert store.get("acme/spam/settings") is None
    store.delete("acme/spam/settings")  # deleting a missing key is fine
    with pytest.raises(TypeError):
        store.put("acme/spam/settings", "not bytes")


def test_a_key_and_keys_under_it_coexist(store):
    store.put("acme/spam", b"parent")
    store.put("acme/spam/settings", b"child")
    assert store.get("acme/spam") == b"parent"
    assert store.get("acme/spam/settings") == b"child"
    assert store.keys("acme/spam") == ["acme/spam", "acme/spam/settings"]
    store.delete("acme/spam")
    assert store.keys("acme") == ["acme/spam/settings"]


def test_overwrite_is_atomic(store):
    """A reader racing a writer sees one whole value or the other, never a mix or a torn one."""
    old, new = b"a" * (256 << 10), b"b" * (256 << 10)
    store.put("acme/spam/reservoir", old)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(40):
                store.put("acme/spam/reservoir", new if i % 2 == 0 else old)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen = set()
    while not done.is_set():
        value = store.get("acme/spam/reservoir")
        assert value in (old, new), f"torn read: {len(value or b'')} bytes"
        seen.add(value[:1])
    t.join()
    assert not errors
    assert store.get("acme/spam/reservoir") == old


# -- listing and deleting ------------------------------------------------------------------------


def test_keys_by_prefix_sorted_and_bounded_by_names(store):
    for key in ["acme/spam/windows/000012", "acme/spam/windows/000002", "acme/spam/settings",
                "acme/spam2/settings", "acme/spam-old/settings", "acme/spa/settings", "beta/spam/settings"]:
        store.put(key, b"x")
    assert store.keys("acme/spam") == ["acme/spam/settings", "acme/spam/windows/000002", "acme/spam/windows/000012"]
    assert store.keys("acme/spam/") == store.keys("acme/spam")
    assert store.keys("acme/spam/windows") == ["acme/spam/windows/000002", "acme/spam/windows/000012"]
    assert store.keys("acme/spam/settings") == ["acme/spam/settings"]
    assert store.keys("acme/spa") == ["acme/spa/settings"]
    assert store.keys("acme/sp") == []
    assert store.keys("nobody") == []
    everything = store.keys("")
    assert everything == sorted(everything) and len(everything) == 7
    assert store.keys() == everything


def test_keys_over_many_scan_pages(store):
    want = sorted(f"acme/spam/feedback/{i:06d}" for i in range(120))
    for key in want:
        store.put(key, b"1")
    store.put("acme/other/feedback/000001", b"1")
    assert store.keys("acme/spam/feedback") == want


def test_delete_prefix_removes_one_tenant_only(store):
    for key in ["acme/spam/settings", "acme/spam/windows/000001", "acme/legal/settings",
                "acme2/spam/settings", "beta/spam/settings"]:
        store.put(key, b"x")
    assert store.delete_prefix("acme/spam") == 2
    assert store.keys("") == ["acme/legal/settings", "acme2/spam/settings", "beta/spam/settings"]
    assert store.delete_prefix("acme") == 1
    assert store.keys("") == ["acme2/spam/settings", "beta/spam/settings"]
    assert store.delete_prefix("acme") == 0
    assert store.get("acme2/spam/settings") == b"x"
    with pytest.raises(ValidationError):
        store.delete_prefix("")  # never "delete every tenant" by accident
    # A deleted prefix is writable again.
    store.put("acme/spam/settings", b"y")
    assert store.keys("acme") == ["acme/spam/settings"]


UNSAFE = ["", "/acme/spam", "acme/spam/", "acme//spam", "acme/../beta", "../acme", "..", ".", "acme/./spam",
          "acme/spam\x00", "acme\\spam", "acme/.hidden", "Acme/spam", "acme/sp am", "acme/spam\n",
          "acme/spam@", "a" * 65, "/".join(["a"] * 17), None, b"acme/spam"]


@pytest.mark.parametrize("key", UNSAFE, ids=repr)
def test_unsafe_keys_are_refused(store, backend, key, tmp_path):
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ValidationError):
        store.put(key, b"x")
    with pytest.raises(ValidationError):
        store.get(key)
    with pytest.raises(ValidationError):
        store.delete(key)
    with pytest.raises(ValidationError):
        with store.lock(key):
            pass
    if key not in ("", "acme/spam/"):  # the two valid prefixes: every key, and one path
        with pytest.raises(ValidationError):
            store.keys(key)
        with pytest.raises(ValidationError):
            store.delete_prefix(key)
    if backend.kind == "file":
        assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    else:
        assert store.keys("") == []


def test_check_key_and_make_key():
    assert check_key("acme/spam/windows/000012") == ("acme", "spam", "windows", "000012")
    assert make_key("acme", "spam", "settings") == "acme/spam/settings"
    with pytest.raises(ValidationError):
        make_key("acme", "../x")
    with pytest.raises(ValidationError):
        make_key("acme", "sp/am", "..")


# -- several instances, several processes -------------------------------------------------------


def test_two_instances_see_each_other(backend):
    a, b = backend.open(), backend.open()
    a.put("acme/spam/settings", b"from a")
    assert b.get("acme/spam/settings") == b"from a"
    b.put("acme/spam/settings", b"from b")
    b.put("acme/legal/settings", b"from b")
    assert a.get("acme/spam/settings") == b"from b"
    assert a.keys("acme") == ["acme/legal/settings", "acme/spam/settings"]
    assert a.delete_prefix("acme/legal") == 1
    assert b.keys("acme") == ["acme/spam/settings"]
    a.close()
    b.close()


def test_lock_excludes_another_process(backend, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    children = [run_child(backend.spec, "count", str(sync), str(i)) for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while not all((sync / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "children did not start"
            assert all(c.poll() is None for c in children), "a child died before starting"
            time.sleep(0.01)
        (sync / "go").touch()
        assert [c.wait(timeout=60) for c in children] == [0, 0]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    store = backend.open()
    assert store.get("acme/spam/counter") == b"100"
    store.close()


def test_lock_times_out_while_held(backend):
    holder, waiter = backend.open(), backend.open()
    with holder.lock("acme/spam/counter"):
        with pytest.raises(BackendError, match="still held"):
            with waiter.lock("acme/spam/counter", timeout_s=0.1):
                pass
        with waiter.lock("acme/spam/other", timeout_s=0.1):  # another name is another lock
            pass
    with waiter.lock("acme/spam/counter", timeout_s=1):
        pass
    holder.close()
    waiter.close()


def test_lock_of_a_crashed_holder_is_freed(backend):
    spec = dict(backend.spec, lease=0.5)  # redis: the dead holder's lease runs out after 0.5 s
    child = run_child(spec, "crash")
    assert child.wait(timeout=30) == 3
    store = backend.open()
    with store.lock("acme/spam/counter", timeout_s=10):
        pass
    store.close()


# -- file layout -------------------------------------------------------------------------------


def test_file_store_layout_and_missing_root(tmp_path):
    root = tmp_path / "data" / "monitor"
    store = FileStore(root)
    assert store.get("acme/spam/settings") is None and store.keys("") == [] and store.delete_prefix("acme") == 0
    store.delete("acme/spam/settings")
    assert not root.exists()
    store.put("acme/spam/settings", b"x")
    assert (root / "acme" / "spam" / "settings@").read_bytes() == b"x"
    with store.lock("acme/spam/settings"):
        assert (root / ".locks" / "acme" / "spam" / "settings@").exists()
    (root / "acme" / "spam" / ".settings@.abc.tmp").write_bytes(b"left by a crashed put")
    (root / "acme" / "spam" / "README").write_bytes(b"not a key")
    assert store.keys("") == ["acme/spam/settings"]  # locks, temp files and strangers are not keys
    assert store.delete_prefix("acme/spam") == 1
    assert not (root / "acme").exists()  # empty folders go too
    store.put("acme/spam/windows/000001", b"x")
    store.delete("acme/spam/windows/000001")
    assert not (root / "acme").exists()


# -- Redis -------------------------------------------------------------------------------------


def test_redis_layout_and_prefix_isolation(redis_server):
    a, b = RedisStore(redis_server.url, "t"), RedisStore(redis_server.url, "u")
    a.put("acme/spam/settings", b"x")
    with a.lock("acme/spam/settings"):
        raw = redis.Redis.from_url(redis_server.url)
        assert raw.get("t:monitor:acme/spam/settings") == b"x"
        assert a.keys("") == ["acme/spam/settings"]  # the lock's key is not a value key
        raw.close()
    assert b.keys("") == [] and b.get("acme/spam/settings") is None
    assert b.delete_prefix("acme") == 0 and a.get("acme/spam/settings") == b"x"


def test_redis_lease_outlived_is_reported(redis_server):
    store = RedisStore(redis_server.url, "t", lock_lease_s=0.1)
    with pytest.raises(BackendError, match="lease"):
        with store.lock("acme/spam/counter"):
            time.sleep(0.3)
    with pytest.raises(ZeroDivisionError):  # the body's own error wins over the lost lease
        with store.lock("acme/spam/counter"):
            time.sleep(0.3)
            1 / 0


def test_redis_outage_is_a_clear_error_and_recovery_works(redis_server):
    store = RedisStore(redis_server.url, "t")
    store.put("acme/spam/settings", b"x")
    redis_server.stop()
    calls = [
        lambda: store.get("acme/spam/settings"),
        lambda: store.put("acme/spam/settings", b"y"),
        lambda: store.delete("acme/spam/settings"),
        lambda: store.keys("acme"),
        lambda: store.delete_prefix("acme"),
        lambda: store.lock("acme/spam/settings").__enter__(),
    ]
    for call in calls:
        with pytest.raises(BackendError, match=f"Redis at 127.0.0.1:{redis_server.port}") as info:
            call()
        assert not isinstance(info.value, redis.RedisError)
    assert store.errors == len(calls)
    redis_server.start()  # same port, empty (no persistence)
    assert store.get("acme/spam/settings") is None
    store.put("acme/spam/settings", b"z")
    assert store.get("acme/spam/settings") == b"z"
    with store.lock("acme/spam/settings"):
        assert store.keys("acme") == ["acme/spam/settings"]
    store.close()


# -- choosing a backend -------------------------------------------------------------------------


def test_open_store_follows_settings(tmp_path, redis_server):
    file_store = open_store(Settings(data_dir=tmp_path / "data"))
    assert isinstance(file_store, FileStore) and file_store.root == tmp_path / "data" / "monitor"
    redis_store = open_store(Settings(data_dir=tmp_path / "data", redis_url=redis_server.url, redis_prefix="p"))
    assert isinstance(redis_store, RedisStore)
    redis_store.put("acme/spam/settings", b"r")
    assert redis.Redis.from_url(redis_server.url).get("p:monitor:acme/spam/settings") == b"r"
    assert file_store.get("acme/spam/settings") is None
    redis_store.close()
