"""``headfleet serve --ray --affinity`` on a local Ray: the router in front of two replicas.

A one-text request goes to the replica that saw the text (its memory tier answers), bad input is
still a 4xx from the router or the replica, and classification requests in flight when a
replica is killed are retried on the other one: every one answers 200.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from http_server import free_port
from headfleet.service.ray_serve import APP_NAME, DEPLOYMENT, REPLICA_HEADER, RETRIED_HEADER, application, bucket
from headfleet.settings import Settings

TEXTS = [f"a note about invoice {i} for the quarterly review" for i in range(24)]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-affinity")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # no local store and no Redis: a text's vector is in one place only, the memory of the replica that made it
        settings = Settings(data_dir=Path(tmp) / "data", device="cpu", faiss_store=False, examples=True)
        serve.run(application(settings, replicas=2, num_cpus=0.5, affinity=True), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def memory_hits(c: httpx.Client) -> tuple[int, set[str]]:
    hits, replicas = 0, set()
    for t in TEXTS:
        r = c.post("/classify", json={"texts": [t], "classifiers": ["spam"]})
        assert r.status_code == 200, r.text
        hits += r.json()["cache"]["hits"]["memory"]
        replicas.add(r.headers[REPLICA_HEADER])
    return hits, replicas


def test_buckets_are_stable_and_only_for_one_text():
    one = bucket("POST", "/classify", b'{"texts": ["Hello  World"], "classifiers": ["spam"]}')
    assert one is not None and one == bucket("POST", "/embed", b'{"inputs": "Hello  World"}')
    assert bucket("POST", "/classify", b'{"texts": ["a", "b"], "classifiers": ["spam"]}') is None
    assert bucket("POST", "/classify", b"{not json") is None
    assert bucket("GET", "/classify", b"") is None


def test_a_repeated_text_is_answered_from_the_memory_of_the_replica_that_saw_it(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        first, replicas = memory_hits(c)
        assert first == 0 and len(replicas) == 2  # the texts spread over both replicas
        # the router learns where each bucket went from Ray's controller within moments; from then on
        # a repeat lands where its vector is. Ray's multiplexed routing is best effort: when the
        # replica holding a bucket does not answer the router's queue probe in time (a loaded
        # machine), the request goes to the other one, which then holds the bucket too (seen once in
        # CI: 22, 24, 23 hits of 24). Round-robin would find 50 %, 75 %, 87 % of the three passes
        # (a missed text is then on both replicas): about 71 % in all, against >= 90 % asserted here.
        later = [memory_hits(c)[0] for _ in range(3)]
        assert sum(later) >= 0.9 * 3 * len(TEXTS), later
        assert max(later) >= len(TEXTS) - 1, later


def test_bad_input_is_a_4xx_through_the_router(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/classify", content=b"{bad")
        assert r.status_code == 400 and r.json()["error_type"] == "invalid_json"
        r = c.post("/classify", json={"texts": ["x"]})
        assert r.status_code == 422 and "classifiers" in r.json()["error"]
        r = c.post("/classify", json={"texts": ["hello"], "classifiers": ["nope"]})
        assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_requests_in_flight_when_a_replica_is_killed_are_retried_on_the_other(url):
    statuses: list[int] = []
    retried: list[str] = []
    stop = threading.Event()

    def load(lane: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while not stop.is_set():
                i += 1
                texts = [f"status of ticket {lane}-{i}-{k}, please" for k in range(4)]  # uncached: in flight a while
                r = c.post("/classify", json={"texts": texts, "classifiers": ["spam"]})
                statuses.append(r.status_code)
                if RETRIED_HEADER in r.headers:
                    retried.append(r.headers[RETRIED_HEADER])
                assert r.status_code == 200, r.text

    with httpx.Client(base_url=url, timeout=120) as c:
        victim = c.get("/health").headers[REPLICA_HEADER]
    loaders = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in loaders:
        t.start()
    time.sleep(2)
    before = len(statuses)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#{victim}", namespace="serve"), no_restart=True)
    time.sleep(6)
    stop.set()
    for t in loaders:
        t.join(120)
    assert len(statuses) > before  # traffic went on after the kill
    assert set(statuses) == {200}, statuses
    # whether a request was in flight on the victim at that instant is chance: reported, not asserted
    print(f"\n{len(statuses)} requests, {len(statuses) - before} after the kill, {len(retried)} answered after a retry")


def test_serve_ray_refuses_before_starting_ray(tmp_path):
    import socket

    from headfleet.errors import ConflictError, ValidationError
    from headfleet.service.ray_serve import parse_autoscale
    from headfleet.service.server import serve_ray

    assert parse_autoscale("1:4") == (1, 4) and parse_autoscale("0:2") == (0, 2)
    for bad in ("4:1", "2", "a:b", "-1:3", "0:0", ""):
        with pytest.raises(ValidationError):
            parse_autoscale(bad)
    with pytest.raises(ValidationError, match="loopback"):  # no keys: loopback only, as plain serve
        serve_ray(Settings(data_dir=tmp_path, host="0.0.0.0"), replicas=2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(ConflictError, match="already in use"):
            serve_ray(Settings(data_dir=tmp_path, port=busy.getsockname()[1]), replicas=2)
    with pytest.raises(ValidationError, match="at least 1"):
        application(Settings(data_dir=tmp_path), replicas=0)
