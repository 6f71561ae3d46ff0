"""``headfleet serve --ray`` on a local Ray: two replicas of the real app behind Ray Serve's proxy,
sharing a real Redis and one data folder.

Which replica answered is read from ``X-Headfleet-Replica``; "the other replica" is reached by
asking again until it answers (the proxy spreads requests over both). One Ray and one deployment
for the module; the test that kills a replica runs last.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from http_server import free_port, running
from headfleet.service.ray_serve import APP_NAME, DEPLOYMENT, REPLICA_HEADER, application
from headfleet.settings import Settings

# the suite's RedisServer (tests/conftest.py), for a module-scoped server
_spec = importlib.util.spec_from_file_location("headfleet_test_root_conftest", Path(__file__).parents[1] / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
RedisServer = _root.RedisServer

ADMIN = "admin-key-for-the-ray-tests"
TRIES = 60  # requests sent to reach a given replica (the proxy picks one of two at random)


def sms(path: Path, n: int, offset: int = 0) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    return rows[offset:offset + n]


class Cluster:
    def __init__(self, url: str, settings: Settings, root: Path):
        self.url, self.settings, self.root = url, settings, root
        self.keys: dict[str, str] = {}

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-serve")
    redis = RedisServer(tmp)
    redis.start()
    root = tmp / "scoring"
    (root / "acme").mkdir(parents=True)
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(data_dir=tmp / "data", device="cpu", redis_url=redis.url, admin_key=ADMIN, examples=False,
                            scoring_root=root, monitor_interval_s=0.2)
        serve.run(application(settings, replicas=2, num_cpus=0.5), name=APP_NAME, route_prefix="/")
        cl = Cluster(f"http://127.0.0.1:{port}", settings, root)
        with cl.client(ADMIN) as admin:  # keys made through whichever replica answers
            for tenant in ("acme", "globex"):
                r = admin.post(f"/admin/tenants/{tenant}/keys")
                assert r.status_code in (200, 201), r.text
                cl.keys[tenant] = r.json()["key"]
        yield cl
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()


def tag(r: httpx.Response) -> str:
    return r.headers[REPLICA_HEADER]


def from_each(call) -> dict[str, httpx.Response]:
    """``call()`` until both replicas answered: replica id -> its response."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(TRIES):
        r = call()
        seen.setdefault(tag(r), r)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replica(s) {sorted(seen)} answered in {TRIES} requests")


def from_other(call, than: str) -> httpx.Response:
    """``call()`` until a replica other than ``than`` answers; its response."""
    for _ in range(TRIES):
        r = call()
        if tag(r) != than:
            return r
    raise AssertionError(f"only replica {than} answered in {TRIES} requests")


def wait_job(c: httpx.Client, job_id: str, timeout: float = 240, tolerate_errors: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get(f"/jobs/{job_id}")
        if r.status_code != 200:
            assert tolerate_errors, r.text
        elif r.json()["job"]["state"] in ("succeeded", "failed", "cancelled"):
            return r.json()["job"]
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish")


def train(c: httpx.Client, name: str, rows, **extra) -> tuple[dict, str]:
    r = c.post("/classifiers", json={"name": name, "examples": [{"text": t, "label": lab} for t, lab in rows],
                                     **extra})
    assert r.status_code == 202, r.text
    return r.json()["job"], tag(r)


def test_a_classifier_trained_through_one_replica_is_served_by_the_other(cluster, sms_spam_path):
    with cluster.client(cluster.keys["acme"]) as acme:
        job, trained_on = train(acme, "spam", sms(sms_spam_path, 120))
        # any replica answers for the job: its owner from memory, the other from the shared record
        done = wait_job(acme, job["id"])
        assert done["state"] == "succeeded", done
        for r in from_each(lambda: acme.get(f"/jobs/{job['id']}")).values():
            assert r.json()["job"]["state"] == "succeeded" and "lease" not in r.json()["job"]
        r = from_other(lambda: acme.post("/classify", json={"texts": ["WINNER!! claim your prize"],
                                                            "classifiers": ["spam"]}), trained_on)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["classifications"]["spam"]["classifier"] == "spam@1"


def test_answers_equal_the_single_process_service(cluster, minilm, sms_spam_path):
    texts = [t for t, _ in sms(sms_spam_path, 12, offset=2000)]
    # the single-process service on the same folder (same registry, same keys), computing its own vectors
    with running(minilm, cluster.settings.data_dir, admin_key=ADMIN, examples=False, faiss_store=False) as single, \
            cluster.client(cluster.keys["acme"]) as acme, \
            httpx.Client(base_url=single.url, timeout=120,
                         headers={"Authorization": f"Bearer {cluster.keys['acme']}"}) as one:
        want = one.post("/classify", json={"texts": texts, "classifiers": ["spam"]}).json()
        want_vecs = np.array(one.post("/embed", json={"inputs": texts}).json())
        for r in from_each(lambda: acme.post("/classify", json={"texts": texts, "classifiers": ["spam"]})).values():
            assert r.status_code == 200, r.text
            for got, exp in zip(r.json()["results"], want["results"]):
                g, e = got["classifications"]["spam"], exp["classifications"]["spam"]
                assert g["label"] == e["label"] and g["version"] == e["version"]
                assert g["scores"].keys() == e["scores"].keys()
                assert all(abs(g["scores"][k] - e["scores"][k]) <= 1e-6 for k in e["scores"])
        for r in from_each(lambda: acme.post("/embed", json={"inputs": texts})).values():
            vecs = np.array(r.json())
            assert vecs.shape == want_vecs.shape and np.abs(vecs - want_vecs).max() <= 1e-6


def test_stats_from_either_replica_add_up_both(cluster):
    """The replicas are one group (``service.peers``): /stats counts every replica's lookups, a peer's
    within about a second, whichever replica answers."""
    sent = []

    def classify():
        sent.append(1)
        return acme.post("/classify", json={"texts": [f"count me {time.time_ns()}"], "classifiers": ["spam"]})

    with cluster.client(cluster.keys["acme"]) as acme:
        time.sleep(1.5)  # the figures of earlier tests have reached the other replica
        before = {tag(r): r.json()["since_start"]["lookups"] for r in from_each(lambda: acme.get("/stats")).values()}
        assert len(set(before.values())) == 1, before
        for r in from_each(classify).values():
            assert r.status_code == 200, r.text
        want = next(iter(before.values())) + len(sent)
        deadline = time.monotonic() + 30
        while True:
            now = {k: r.json() for k, r in from_each(lambda: acme.get("/stats")).items()}
            if all(s["since_start"]["lookups"] == want and s["processes"] == 2 for s in now.values()):
                break
            assert time.monotonic() < deadline, (want, now)
            time.sleep(0.3)


def test_tenants_stay_isolated_across_replicas(cluster):
    with cluster.client(cluster.keys["globex"]) as globex, cluster.client(cluster.keys["acme"]) as acme:
        jobs = acme.get("/jobs").json()["jobs"]
        assert jobs, "acme has a training job by now"
        for r in from_each(lambda: globex.post("/classify", json={"texts": ["hi"], "classifiers": ["spam"]})).values():
            assert r.status_code == 404 and r.json()["error_type"] == "not_found"
        for r in from_each(lambda: globex.get(f"/jobs/{jobs[0]['id']}")).values():
            assert r.status_code == 404
        for r in from_each(lambda: globex.get("/jobs")).values():
            assert r.json()["jobs"] == []
        for r in from_each(lambda: globex.get("/classifiers")).values():
            assert r.status_code == 200 and "spam" not in json.dumps(r.json())
        for r in from_each(lambda: httpx.get(f"{cluster.url}/classifiers", headers={"Authorization": "Bearer nope"})
                           ).values():
            assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"


def test_feedback_and_an_outcome_posted_to_one_replica_count_on_the_other(cluster, sms_spam_path):
    with cluster.client(cluster.keys["acme"]) as acme:
        r = acme.post("/feedback", json={"classifier": "spam", "items": [{"text": "see you at the station", "label": "ham"}]})
        assert r.status_code == 200, r.text
        r2 = from_other(lambda: acme.get("/classifiers/spam/canary"), tag(r))
        assert r2.status_code == 200 and r2.json()["rolling"] == 1, r2.text

        job, _ = train(acme, "spam", sms(sms_spam_path, 120, offset=200), kind="mlp", candidate=True)
        assert wait_job(acme, job["id"])["state"] == "succeeded"
        r = acme.post("/experiments", json={"classifier": "spam", "control": "latest", "treatment": "candidate"})
        assert r.status_code == 201, r.text
        exp, created_on = r.json(), tag(r)
        # the other replica sees the new experiment within its refresh (1 s); the unit's exposure is folded
        # into the shared store by the replica that answered it within its interval; until then the outcome
        # is refused (not counted), and a retry with the same id is harmless
        deadline = time.monotonic() + 60
        while True:
            c = acme.post("/classify", json={"texts": ["free entry"], "classifiers": ["spam"], "unit": "user-1"})
            entry = c.json()["results"][0]["classifications"]["spam"]
            if "experiment" in entry:
                arm = entry["experiment"]["arm"]
                o = acme.post(f"/experiments/{exp['id']}/outcomes", json={"items": [{"unit": "user-1", "value": 1,
                                                                                    "id": "visit-1"}]}).json()
                if o["accepted"] or o["duplicates"]:
                    break
            assert time.monotonic() < deadline, entry
            time.sleep(0.3)
        for r in from_each(lambda: acme.get(f"/experiments/{exp['id']}")).values():
            arms = r.json()["arms"]
            assert arms[arm]["n_units"] == 1 and arms[arm]["mean"] == 1.0, arms
        assert from_other(lambda: acme.get(f"/experiments/{exp['id']}"), created_on).status_code == 200
        assert acme.post(f"/experiments/{exp['id']}/stop", json={"decision": "rollback"}).status_code == 200


def test_a_scoring_job_finishes_after_the_replica_running_it_is_killed(cluster, sms_spam_path):
    n = 1600  # four chunks of 512: the kill comes after the first, with three to go
    with open(cluster.root / "acme" / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, (t, _) in enumerate(sms(sms_spam_path, n, offset=3000)):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    statuses: list[int] = []
    stop = threading.Event()

    def load(lane: int) -> None:  # live traffic while the replica dies: what a client sees is recorded
        with cluster.client(cluster.keys["acme"]) as c:
            i = 0
            while not stop.is_set():
                i += 1
                texts = [f"call me later about order {lane}-{i}-{k}" for k in range(4)]  # uncached: in flight a while
                try:
                    r = c.post("/classify", json={"texts": texts, "classifiers": ["spam"]})
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        print(f"\n  {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    print(f"\n  {type(exc).__name__}: {exc}")
                    statuses.append(-1)

    with cluster.client(cluster.keys["acme"]) as acme:
        r = acme.post("/jobs", json={"source": "docs.jsonl", "classifiers": ["spam"], "output": "out.jsonl"})
        assert r.status_code == 202, r.text
        job_id, owner = r.json()["job"]["id"], tag(r)
        deadline = time.monotonic() + 240
        while True:  # one chunk committed, so the job is mid-way when its replica dies
            p = acme.get(f"/jobs/{job_id}").json()["job"]
            assert p["state"] in ("queued", "running"), f"the job ended before its replica could be killed: {p}"
            if p["progress"]["documents"] >= 512:
                break
            assert time.monotonic() < deadline, p
            time.sleep(0.3)
        loaders = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(2)]
        for t in loaders:
            t.start()
        time.sleep(1)  # requests in flight on both replicas
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#{owner}", namespace="serve"), no_restart=True)
        time.sleep(5)  # the replica's death as a client sees it; then the job has the CPUs to itself
        stop.set()
        for t in loaders:
            t.join(60)
        done = wait_job(acme, job_id, tolerate_errors=True)
    assert done["state"] == "succeeded", done
    assert done["restarts"] == 1 and done["report"]["runs"] == 2 and done["report"]["documents"] == n
    ids = [json.loads(line)["id"] for line in (cluster.root / "acme" / "out.jsonl").read_text().splitlines()]
    assert ids == [str(i) for i in range(n)]  # every document once, in order
    failed = [s for s in statuses if s != 200]
    print(f"\nlive /classify while a replica died: {len(statuses)} requests, not 200: {sorted(set(failed))} "
          f"x{len(failed)}")
    assert all(s == 200 or s >= 500 or s == -1 for s in statuses)  # never a 4xx for a good request


def test_replicas_share_keys_through_the_keys_file(tmp_path):
    """What each replica's KeyStore does on one keys file (no Ray needed): a key made or revoked by one
    is honoured by the other at its next lookup, and keys made at once by both all land."""
    from headfleet.errors import UnauthorizedError
    from headfleet.service.auth import KeyStore

    path = tmp_path / "keys.json"
    a, b = KeyStore(path, admin_key=ADMIN), KeyStore(path, admin_key=ADMIN)
    made = a.create("acme")
    assert b.tenant_for(made["key"]) == "acme" and "acme" in b.tenants()
    b.revoke(made["key_id"])
    with pytest.raises(UnauthorizedError):
        a.tenant_for(made["key"])
    keys: list[str] = []
    threads = [threading.Thread(target=lambda s=s, i=i: keys.append(s.create(f"t{i}")["key"]))
               for i in range(20) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = KeyStore(path, admin_key=ADMIN)
    assert len(keys) == 40 and sorted(fresh.tenant_for(k) for k in keys) == sorted(f"t{i}" for i in range(20) for _ in "ab")
