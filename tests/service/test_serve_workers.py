"""``headfleet serve --workers 2``: two real worker processes on one port and one data folder.

What a user of several workers must be able to rely on: the cache-hit report and the Prometheus
series are the whole service's, not the one worker a request happened to reach; a worker that dies
is replaced and what it counted is kept; a backbone reload reaches every worker. The backbone is a
tiny random BERT (recorded in the folder, so both workers start in seconds), reloaded to the real
MiniLM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from headfleet.atomic import write_json_atomic
from headfleet.engine import Engine
from headfleet.heads import load_examples
from headfleet.settings import Settings

from tests.service.http_server import free_port

REPO = Path(__file__).resolve().parents[2]
KEYS = {"acme": "key-acme", "bob": "key-bob"}
ADMIN = "key-admin"


def _wait(what, timeout: float = 60.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting: {what.__doc__ or what}"
        time.sleep(step)


def _members(data: Path) -> list[dict]:
    """The heartbeats of the run's members (``service.peers``)."""
    (group,) = [g for g in (data / "run").iterdir() if g.is_dir()]
    out = []
    for f in group.glob("*.json"):
        if f.stem != "reload":
            try:
                out.append(json.loads(f.read_text()))
            except ValueError:  # being replaced right now
                continue
    return out


def _alive(pid: int) -> bool:
    """Running (an exited orphan nobody reaped yet is a zombie: not alive)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.fixture
def workers(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_json_atomic(data / "backbone.json", {"model": str(tiny_model_dir), "backend": "torch", "precision": "fp32",
                                               "fingerprint": None, "chosen": "test", "previous": None})
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False, max_length=128)
                     .with_recorded_backbone()) as engine:
        engine.train("acme", "spam", load_examples(REPO / "engine" / "example_data" / "spam.csv"))
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HEADFLEET_DATA_DIR=str(data), HEADFLEET_DEVICE="cpu",
               HEADFLEET_MAX_LENGTH="128",  # the tiny model's limit
               HEADFLEET_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()), HEADFLEET_ADMIN_KEY=ADMIN)
    proc = subprocess.Popen([sys.executable, "-m", "headfleet.service.cli", "serve", "--port", str(port),
                             "--workers", "2", "--log-level", "warning"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    answered: set[str] = set()

    def up():
        """both workers answer (each listens only once its app has started)"""
        assert proc.poll() is None, proc.stderr.read()
        try:
            r = httpx.get(base + "/health", timeout=2)  # a new connection each time
        except httpx.TransportError:
            return False
        answered.add(r.headers["x-headfleet-worker"])
        return len(answered) == 2

    try:
        _wait(up, 180, 0.1)
        yield base, data, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def _classify(base: str, n: int, tag: str) -> None:
    """``n`` one-text requests, each on a new connection, so the kernel spreads them over the workers."""
    for i in range(n):
        r = httpx.post(base + "/classify", json={"texts": [f"win a free prize now {tag} {i}"], "classifiers": ["spam"]},
                       headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=60)
        assert r.status_code == 200, r.text


def _stats(base: str, tenant: str) -> dict:
    return httpx.get(base + "/stats", headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30).json()


def test_workers_share_the_report_the_metrics_and_a_reload_and_a_dead_worker_loses_nothing(workers, minilm):
    base, data, proc = workers
    _classify(base, 40, "a")

    def counted():
        """/stats (from whichever worker answers) counts all 40 lookups of both workers"""
        s = _stats(base, "acme")
        return s if s["since_start"]["lookups"] == 40 and s["processes"] == 2 else None

    stats = _wait(counted, 30)
    assert stats["since_start"]["classifiers"]["spam"]["lookups"] == 40
    # the windows add up both workers' buckets too ("1m" is the last 50-60 s, which the 40 may
    # outlast on a slow machine; "5m" holds them all)
    assert stats["windows"]["5m"]["lookups"] == stats["windows"]["1h"]["lookups"] == 40
    members = _members(data)
    (group,) = [g for g in (data / "run").iterdir() if g.is_dir()]
    served = [m for m in members if (group / m["member"] / "acme.json").exists()]
    assert len(served) == 2, "40 new connections all reached one worker: the test proves nothing"
    other = _stats(base, "bob")  # another tenant sees none of it
    assert other["since_start"]["lookups"] == 0 and other["since_start"]["classifiers"] == {}

    def fleet():
        """the operator's view (whichever worker answers) adds up the workers too"""
        return httpx.get(base + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=30).json()["tenants"]["acme"]["lookups"] == 40

    _wait(fleet, 10)  # another worker's figures are at most a second old

    # Prometheus' multiprocess files are written as each request is counted: no wait
    metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    count = re.search(r'headfleet_request_seconds_count\{endpoint="/classify",status="2xx"\} (\S+)', metrics)
    assert count and float(count.group(1)) == 40.0, metrics[:2000]
    lookups = sum(float(v) for v in re.findall(r'headfleet_cache_lookups_total\{tier="[a-z]+"\} (\S+)', metrics))
    assert lookups == 40.0

    # a worker killed outright: the supervisor starts another, and what the dead one counted stays
    time.sleep(1.5)  # its last heartbeat has been written
    victim = members[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: not _alive(victim), 10)
    _wait(lambda: sum(1 for m in _members(data) if m["pid"] != victim and not m["stopped"]) == 2, 120, 0.5)
    _wait(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 60)
    _classify(base, 10, "b")
    after = _wait(lambda: (s := _stats(base, "acme"))["since_start"]["lookups"] == 50 and s, 30)
    assert after["processes"] == 3  # two live workers and the dead one, whose figures still count
    # the dead worker's live gauges left the Prometheus sums; its counters stayed
    assert not list((group / "prometheus").glob(f"gauge_live*_{victim}.db"))
    assert list((group / "prometheus").glob(f"counter_{victim}.db"))

    # a reload answered by one worker reaches the other
    old = httpx.get(base + "/info").json()["backbone"]["fingerprint"]
    write_json_atomic(data / "backbone.json", {"model": None, "backend": "torch", "precision": "fp32",
                                               "fingerprint": minilm.fingerprint, "chosen": "test", "previous": None})
    r = httpx.post(base + "/admin/backbone/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["reloaded"] is True and done["from"]["fingerprint"] == old != minilm.fingerprint
    assert done["workers"]["members"] == 2 and len(done["workers"]["followed"]) == 1, done["workers"]
    assert done["workers"]["pending"] == [] and done["workers"]["failed"] == {}
    live = [m for m in _members(data) if m["pid"] != victim]
    assert {m["fingerprint"] for m in live} == {minilm.fingerprint}
    for _ in range(12):  # new connections, so both workers answer some
        assert httpx.get(base + "/info").json()["backbone"]["fingerprint"] == minilm.fingerprint
    # the report carries over the reload: the 50 lookups before it are still there
    assert _stats(base, "acme")["since_start"]["lookups"] == 50

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert all(m["stopped"] for m in _members(data) if m["pid"] != victim)  # each wrote its last figures


def test_workers_stop_by_themselves_when_the_parent_is_killed(workers):
    """Nobody is left to stop or replace them: each stops as on SIGTERM and writes its last figures."""
    base, data, proc = workers
    _classify(base, 4, "k")
    pids = [m["pid"] for m in _members(data)]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.kill()
    proc.wait(10)
    _wait(lambda: not any(_alive(p) for p in pids), 20)
    assert all(m["stopped"] for m in _members(data))
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/health", timeout=2)


def test_a_worker_that_cannot_start_stops_serve_with_an_error(tmp_path):
    """A setting every worker fails on ends ``serve`` with exit 1, not a restart loop."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HEADFLEET_DATA_DIR=str(tmp_path / "data"), HEADFLEET_DEVICE="cpu",
               HEADFLEET_BACKEND="torch", HEADFLEET_PRECISION="fp32", HEADFLEET_MAX_LENGTH="100000")
    proc = subprocess.run([sys.executable, "-m", "headfleet.service.cli", "serve", "--port", str(free_port()),
                           "--workers", "2", "--no-examples", "--log-level", "warning"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "max_length 100000 is outside" in proc.stderr and "failed to start" in proc.stderr
