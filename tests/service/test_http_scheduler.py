"""The scheduler seen from outside: fairness across tenants, 429s, dropped clients, Redis outage."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import redis

A, B = "key-a", "key-b"


def unique_texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} message number {i} about order {i * 7919 % 1000} and delivery" for i in range(n)]


async def _wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def test_tenant_b_is_served_while_tenant_a_floods(start_server):
    server = start_server(api_keys=f"a:{A},b:{B}", examples=False, batch_tokens=2048)
    sched = server.service.scheduler
    done: list[tuple[str, float, dict]] = []

    async def call(client, key, who, texts):
        r = await client.post("/embed", json={"inputs": texts}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        done.append((who, time.perf_counter(), r))

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            flood = [asyncio.create_task(call(client, A, f"A{i}", unique_texts(f"flood {i}", 128))) for i in range(4)]
            await _wait_until(lambda: sched.waiting_for("a") >= 256)  # A's requests are queued
            queued_a = sched.waiting_for("a")
            await call(client, B, "B", ["one short text from tenant b"])
            a_left_when_b_done = sched.waiting_for("a")
            await asyncio.gather(*flood)
            return queued_a, a_left_when_b_done

    queued_a, a_left = asyncio.run(scenario())
    order = [who for who, _, _ in done]
    # B's single text finished before A's flood did: before the last A request, with A texts still queued
    assert order.index("B") < max(order.index(f"A{i}") for i in range(4)), order
    assert a_left > 0, "A's queue had drained before B was answered"
    assert queued_a >= 256


def test_queue_limits_answer_429_with_retry_after_and_spare_other_tenants(start_server):
    server = start_server(api_keys=f"a:{A},b:{B}", examples=False, tenant_queue_texts=64, queue_texts=1000,
                          batch_tokens=8192)  # the first request fits one batch
    sched = server.service.scheduler

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            ha = {"Authorization": f"Bearer {A}"}
            first = asyncio.create_task(client.post("/embed", json={"inputs": unique_texts("first", 64)}, headers=ha))
            await _wait_until(lambda: sched.in_flight > 0)  # the first 64 are in the backbone
            second = asyncio.create_task(client.post("/embed", json={"inputs": unique_texts("second", 60)},
                                                     headers=ha))
            await _wait_until(lambda: sched.waiting_for("a") == 60)
            over = await client.post("/embed", json={"inputs": unique_texts("third", 10)}, headers=ha)
            other = await client.post("/embed", json={"inputs": ["tenant b is not held up"]},
                                      headers={"Authorization": f"Bearer {B}"})
            return over, other, await first, await second

    over, other, first, second = asyncio.run(scenario())
    assert over.status_code == 429
    assert over.json()["error_type"] == "overloaded" and "at most 64 may wait" in over.json()["error"]
    assert int(over.headers["retry-after"]) >= 1
    assert other.status_code == 200
    assert first.status_code == 200 and second.status_code == 200  # nothing admitted was lost


def test_a_request_whose_client_left_is_dropped_and_counted(single, client):
    sched = single.service.scheduler
    dropped_before = sched.dropped_texts
    submitted_before = sched.submitted_texts
    gone_texts = unique_texts("client left", 20)

    async def scenario():
        async with httpx.AsyncClient(base_url=single.url, timeout=300) as ac:
            flood = asyncio.create_task(ac.post("/embed", json={"inputs": unique_texts("ahead", 384)}))
            await _wait_until(lambda: sched.waiting > 100)
            body = httpx.Request("POST", "/embed", json={"inputs": gone_texts}).content
            with socket.create_connection(("127.0.0.1", single.port)) as s:
                s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                # its texts are queued behind the flood, then the client hangs up
                await _wait_until(lambda: sched.submitted_texts >= submitted_before + 384 + len(gone_texts))
            await _wait_until(lambda: sched.dropped_texts > dropped_before)
            return await flood

    assert asyncio.run(scenario()).status_code == 200
    assert sched.dropped_texts - dropped_before == len(gone_texts)
    # none of its texts went through the backbone: asking for them now computes all of them
    again = client.post("/classify", json={"texts": gone_texts, "classifiers": ["spam"]}).json()
    assert again["cache"]["computed"] == len(gone_texts)


def test_redis_outage_leaves_classify_answering_and_health_degraded(start_server, redis_server):
    server = start_server(redis_url=redis_server.url)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/classify", json={"texts": ["written to redis too"], "classifiers": ["spam"]})
        assert r.status_code == 200
        assert c.get("/health").json()["status"] == "ready"
        redis_server.stop()
        r = c.post("/classify", json={"texts": ["redis is gone now", "written to redis too"],
                                      "classifiers": ["spam", "urgency"]})
        assert r.status_code == 200, r.text
        assert r.json()["cache"]["computed"] == 1 and r.json()["results"][1]["cache"] == "memory"
        health = c.get("/health").json()
        assert health["status"] == "degraded" and "redis" in health["reason"]
        redis_server.start()
        # however long the tier's back-off window is: traffic goes on answering, and health comes back
        deadline = time.monotonic() + 30
        while True:
            r = c.post("/classify", json={"texts": ["redis is back"], "classifiers": ["spam"]})
            assert r.status_code == 200, r.text
            if c.get("/health").json()["status"] == "ready":
                break
            assert time.monotonic() < deadline, "health did not come back to ready after Redis restarted"
            time.sleep(0.1)


def test_redis_serves_a_second_replica(start_server, redis_server, minilm, tmp_path):
    first = start_server(redis_url=redis_server.url, examples=False)
    second = start_server(redis_url=redis_server.url, examples=False)
    texts = ["shared through redis between replicas"]
    with httpx.Client(base_url=first.url, timeout=60) as c:
        assert c.post("/embed", json={"inputs": texts}).status_code == 200
    # the write-back runs off the reply path: wait until the vector is in Redis itself (this Redis is
    # this test's own; the cache tier's keys are "<prefix>:v1:<key>", the monitor's "<prefix>:monitor:...")
    with redis.Redis.from_url(redis_server.url) as r:
        deadline = time.monotonic() + 30
        while not list(r.scan_iter(match="hf:v1:*")):
            assert time.monotonic() < deadline, "the first replica's vector never reached Redis"
            time.sleep(0.01)
    with httpx.Client(base_url=second.url, timeout=60) as c:
        c.post("/embed", json={"inputs": texts})
        stats = c.get("/stats").json()["since_start"]
    assert stats["hits"]["redis"] == 1 and stats["computed"] == 0
