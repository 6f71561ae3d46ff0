"""Job ownership on a shared jobs folder: owners, heartbeats, take-overs (``service.job_records``).

Another process is a real one (``multiprocessing`` with the spawn method): its ``flock`` is
released by the kernel when it is killed, as a crashed replica's is.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import signal
import threading
import time

import httpx
import pytest
from http_server import running, wait_for_job
from importlib import resources

from headfleet.engine.examples import EXAMPLES
from headfleet.service.job_records import JobRecords, LeaseLost
from headfleet.service.jobs import JobManager


def _record(job_id: str, state: str = "running") -> dict:
    return {"id": job_id, "type": "retrain", "state": state, "created": "2026-01-01T00:00:00Z",
            "progress": {"embedded": 0, "total": 10}}


def _own_and_wait(root: str, job_id: str, ready) -> None:
    """A replica that owns ``job_id`` and lives until killed."""
    records = JobRecords(root)
    records.create("acme", _record(job_id))
    ready.set()
    time.sleep(600)


@pytest.fixture
def other_owner(tmp_path):
    """Start another process owning job ``job_a``; yields a function that kills it."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_own_and_wait, args=(str(tmp_path), "job_a", ready), daemon=True)
    proc.start()
    assert ready.wait(120), "the owner process did not start"

    def kill() -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)

    yield kill
    if proc.is_alive():
        kill()


def test_a_later_replica_never_touches_a_live_owners_running_job(tmp_path, other_owner):
    # a replica starting on the folder (its start-up sweep and a few more) leaves the job alone
    jobs = JobManager(None, None, tmp_path, sweep_s=0.05)
    try:
        time.sleep(0.3)
        record = JobRecords(tmp_path).read("acme", "job_a")
        assert record["state"] == "running" and record["lease"]["owner"] != jobs.records.owner
        assert not jobs.records.orphaned(record)
        assert jobs.get("acme", "job_a")["state"] == "running"  # answered from the shared record
        assert "lease" not in jobs.get("acme", "job_a")
    finally:
        jobs.close()


def test_a_dead_owners_job_is_taken_over_once(tmp_path, other_owner):
    other_owner()
    a, b = JobRecords(tmp_path), JobRecords(tmp_path)
    assert a.orphaned(a.read("acme", "job_a"))
    won = []
    threads = [threading.Thread(target=lambda r=r: won.append(r.claim("acme", "job_a"))) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(x is not None for x in won) == 1
    winner = a if a.mine(a.read("acme", "job_a")) else b
    loser = b if winner is a else a
    assert not loser.orphaned(loser.read("acme", "job_a"))
    # the loser cannot write the record any more
    with pytest.raises(LeaseLost):
        loser.renew("acme", _record("job_a"))


def test_a_retrain_of_a_dead_owner_fails_saying_so(tmp_path, other_owner):
    other_owner()
    jobs = JobManager(None, None, tmp_path)  # its start-up sweep takes the orphan over
    try:
        job = jobs.get("acme", "job_a")
        assert job["state"] == "failed" and job["error"]["error_type"] == "interrupted"
    finally:
        jobs.close()


def test_a_stale_heartbeat_is_an_orphan_even_when_the_owner_file_is_held(tmp_path):
    owner = JobRecords(tmp_path, lease_s=0.2)
    owner.create("acme", _record("job_b"))
    other = JobRecords(tmp_path)
    assert not other.orphaned(other.read("acme", "job_b"))
    time.sleep(0.3)  # the owner stopped renewing for longer than its lease
    assert other.orphaned(other.read("acme", "job_b"))
    assert other.claim("acme", "job_b") is not None
    with pytest.raises(LeaseLost):
        owner.renew("acme", _record("job_b"))
    owner.close()


def test_records_without_a_lease_and_a_closed_owner_are_orphans(tmp_path):
    legacy = JobRecords(tmp_path)
    legacy.save("acme", _record("job_c"))  # written before leases existed
    assert JobRecords(tmp_path).orphaned(legacy.read("acme", "job_c"))
    owner = JobRecords(tmp_path)
    owner.create("acme", _record("job_d"))
    assert not JobRecords(tmp_path).orphaned(owner.read("acme", "job_d"))
    owner.close()  # a clean stop lets its jobs go at once
    assert JobRecords(tmp_path).orphaned(owner.read("acme", "job_d"))


def test_ids_that_are_not_names_read_as_missing(tmp_path):
    records = JobRecords(tmp_path)
    records.create("acme", _record("job_e"))
    for bad in ("../acme/job_e", "job_e/../job_e", "", "JOB_E"):
        assert records.read("acme", bad) is None
    assert records.read("globex", "job_e") is None  # another tenant's folder


def test_a_training_job_of_a_dead_replica_runs_again_from_its_saved_examples(minilm, tmp_path):
    with resources.as_file(resources.files("headfleet.engine") / "example_data" / EXAMPLES["spam"]) as path:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    data = tmp_path / "data"
    # what a replica that died mid-training leaves: a running record with its lease, and the job's input
    dead = JobRecords(data / "jobs")
    dead.save_input("default", "job_f", {"name": "spam", "kind": "logreg", "seed": 0, "candidate": False,
                                         "examples": {"texts": [t for t, _ in rows], "labels": [lab for _, lab in rows],
                                                      "multi_label": False}})
    dead.create("default", {**_record("job_f"), "type": "train", "classifier": "spam", "restarts": 0})
    dead.close()
    with running(minilm, data, examples=False) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        job = wait_for_job(c, "job_f")
        assert job["state"] == "succeeded" and job["restarts"] == 1, job
        assert job["result"]["version"] == 1
        assert c.post("/classify", json={"texts": ["win a prize"], "classifiers": ["spam"]}).status_code == 200
    assert JobRecords(data / "jobs").read_input("default", "job_f") is None  # gone once the job finished
