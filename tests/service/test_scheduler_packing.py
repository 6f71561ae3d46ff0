"""Deficit round-robin packing, checked batch by batch (no HTTP, the real engine)."""

from __future__ import annotations

import asyncio

import pytest

from headfleet.errors import OverloadedError
from headfleet.engine import Engine
from headfleet.service.scheduler import Scheduler, estimate_tokens
from headfleet.settings import Settings


@pytest.fixture
def engine(minilm, tmp_path):
    eng = Engine.open(Settings(data_dir=tmp_path, device="cpu"), embedder=minilm)
    yield eng
    eng.close()


def submit(sched: Scheduler, tenant: str, n: int, **kw):
    texts = [f"{tenant} text {i}" for i in range(n)]
    keys = [f"{tenant}{i}".encode().ljust(16, b"_")[:16] for i in range(n)]
    return sched.submit(tenant, keys, texts, ["ns"] * n, **kw)


async def packer(engine, **limits) -> Scheduler:
    """A started scheduler whose own loop is stopped, so the test drives ``pack()`` by hand."""
    sched = Scheduler(engine.fill, engine.write_back, max_length=engine.embedder.max_length, batch_texts=64,
                      **limits)
    await sched.start()
    sched._task.cancel()
    return sched


def test_small_tenants_ride_in_the_first_batch_behind_a_flood(engine):
    async def scenario():
        sched = await packer(engine, batch_tokens=4096, tenant_queue_texts=10_000, queue_texts=10_000)
        flood = [submit(sched, "a", 300) for _ in range(3)]
        b = submit(sched, "b", 1)
        c = submit(sched, "c", 3)
        first = sched.pack()
        owners = [w.tenant for w, _ in first]
        assert owners.count("b") == 1 and owners.count("c") == 3
        assert len(first) == 64
        # every later batch keeps serving A, in order, until its queue drains
        seen = sum(1 for o in owners if o == "a")
        while sched.waiting:
            batch = sched.pack()
            assert batch and all(w.tenant == "a" for w, _ in batch)
            assert len(batch) <= 64 and sum(w.costs[i] for w, i in batch) <= 4096
            seen += len(batch)
        assert seen == 900
        assert all(w.next == len(w.keys) for w in flood + [b, c])

    asyncio.run(scenario())


def test_token_budget_bounds_a_batch_of_long_texts(engine):
    async def scenario():
        sched = await packer(engine, batch_tokens=1024, tenant_queue_texts=10_000, queue_texts=10_000)
        long = ["word " * 300] * 10
        sched.submit("a", [bytes([i]) * 16 for i in range(10)], long, ["ns"] * 10)
        batch = sched.pack()
        cost = estimate_tokens(long[0], engine.embedder.max_length)
        assert len(batch) == 1024 // cost and cost == engine.embedder.max_length

    asyncio.run(scenario())


def test_admission_is_per_tenant_then_global(engine):
    async def scenario():
        sched = await packer(engine, batch_tokens=4096, tenant_queue_texts=100, queue_texts=150)
        submit(sched, "a", 100)
        with pytest.raises(OverloadedError, match="tenant 'a' has 100 texts waiting"):
            submit(sched, "a", 1)
        submit(sched, "b", 50)
        with pytest.raises(OverloadedError, match="queue holds 150 texts") as err:
            submit(sched, "c", 1)
        assert err.value.retry_after >= 1
        submit(sched, "c", 1, admit=False)  # training jobs wait instead of being refused
        assert sched.rejected == 2 and sched.waiting == 151

    asyncio.run(scenario())


def test_a_flood_batch_yields_between_pieces_while_a_smaller_batch_runs(engine):
    """On a CPU a batch is computed in pieces of ``yield_tokens``; while another tenant's smaller
    batch runs, the flood's next piece waits, so the small one has the cores to itself. The pieces'
    answers are the same vectors as one whole forward."""
    import threading
    import time

    import numpy as np

    calls, lock = [], threading.Lock()

    def fill(keys, texts, namespaces):
        t0 = time.perf_counter()
        out = engine.fill(keys, texts, namespaces)
        with lock:
            calls.append((texts[0].split()[0], t0, time.perf_counter(), len(keys)))
        return out

    BOB = "bob asks: " + " ".join(f"is lunch at noon on day {d} of the offsite, and who books the table?"
                                  for d in range(6))  # about 100 tokens: a forward long enough to overlap
    flood_texts = [f"tenant a sends a rather long message number {i} about the quarterly invoices and the "
                   f"delivery schedule for the northern warehouse" for i in range(24)]

    async def scenario():
        sched = Scheduler(fill, engine.write_back, max_length=engine.embedder.max_length, batch_texts=64,
                          batch_tokens=4096, tenant_queue_texts=1000, queue_texts=1000, yield_tokens=48)
        await sched.start()
        try:
            keys = [f"a{i}".encode().ljust(16, b"_") for i in range(len(flood_texts))]
            flood = asyncio.ensure_future(sched.run("a", keys, flood_texts, ["tenant:a"] * len(keys)))
            while not calls:  # the flood's first piece has run: its batch is in flight
                await asyncio.sleep(0.001)
            small = await sched.run("b", [b"b0".ljust(16, b"_")], [BOB], ["tenant:b"])
            big = await flood
            return sched, big, small
        finally:
            await sched.stop()

    sched, big, small = asyncio.run(scenario())
    a_pieces = [c for c in calls if c[0] == "tenant"]
    b_calls = [c for c in calls if c[0] == "bob"]
    assert len(a_pieces) >= 4 and sum(c[3] for c in a_pieces) == len(flood_texts)  # one batch, in pieces
    assert len(b_calls) == 1
    _, b_start, b_end, _ = b_calls[0]
    # no piece of the flood started while the small batch ran: it waited at its piece boundary
    assert not [c for c in a_pieces if b_start < c[1] < b_end], (b_start, b_end, a_pieces)
    whole = engine.embedder.embed(flood_texts).vectors
    got = np.stack([big[0][f"a{i}".encode().ljust(16, b"_")].vector for i in range(len(flood_texts))])
    assert np.allclose(got, whole, atol=1e-5)
    assert small[0][b"b0".ljust(16, b"_")].computed


def test_a_text_packed_beside_a_flood_is_answered_when_its_piece_ends_and_its_lane_is_free_again(engine):
    """Tenant B's text lands in the same batch as tenant A's flood: B's row goes into the first
    piece, on its own, and B's request is answered when that piece ends, not when A's batch does.
    B's next request then starts beside A's batch instead of waiting for it. A's vectors are the
    same as one whole forward's."""
    import threading
    import time

    import numpy as np

    calls, lock = [], threading.Lock()

    def fill(keys, texts, namespaces):
        t0 = time.perf_counter()
        out = engine.fill(keys, texts, namespaces)
        with lock:
            calls.append((texts, t0, time.perf_counter()))
        return out

    flood_texts = [f"tenant a sends a rather long message number {i} about the quarterly invoices and the "
                   f"delivery schedule for the northern warehouse" for i in range(24)]
    a_keys = [f"a{i}".encode().ljust(16, b"_") for i in range(len(flood_texts))]

    async def scenario():
        sched = Scheduler(fill, engine.write_back, max_length=engine.embedder.max_length, batch_texts=64,
                          batch_tokens=4096, tenant_queue_texts=1000, queue_texts=1000, yield_tokens=48)
        await sched.start()
        try:
            # both submitted before the scheduler task runs: deficit round-robin packs them into one batch
            flood = asyncio.ensure_future(sched.run("a", a_keys, flood_texts, ["tenant:a"] * len(a_keys)))
            first = asyncio.ensure_future(sched.run("b", [b"b0".ljust(16, b"_")], ["bob: lunch?"], ["tenant:b"]))
            b1 = await first
            b1_at = time.perf_counter()
            assert not flood.done()
            b2 = await sched.run("b", [b"b1".ljust(16, b"_")], ["bob: lunch at noon?"], ["tenant:b"])
            b2_at = time.perf_counter()
            big = await flood
            return sched, big, b1, b1_at, b2, b2_at, time.perf_counter()
        finally:
            await sched.stop()

    sched, big, b1, b1_at, b2, b2_at, a_at = asyncio.run(scenario())
    assert calls[0][0] == ["bob: lunch?"]  # B's row first, in a piece of its own
    a_pieces = [c for c in calls if c[0][0].startswith("tenant a")]
    assert len(a_pieces) >= 4 and sum(len(c[0]) for c in a_pieces) == len(flood_texts)
    assert not any(t.startswith("bob") for c in a_pieces for t in c[0])  # no piece mixes the two lanes
    assert b1_at < a_pieces[-1][1]  # B had its answer before A's last piece started
    b2_call = next(c for c in calls if c[0] == ["bob: lunch at noon?"])  # in a batch of its own
    assert b2_call[1] < a_pieces[-1][2]  # B's next text ran while A's batch was still going
    assert b2_at < a_at
    whole = engine.embedder.embed(flood_texts).vectors
    assert np.allclose(np.stack([big[0][k].vector for k in a_keys]), whole, atol=1e-5)
    assert b1[0][b"b0".ljust(16, b"_")].computed and b2[0][b"b1".ljust(16, b"_")].computed


def _fake_fill(seconds_per_token: float, served: list, fail_on: str | None = None):
    """A backbone stand-in for scheduling tests: sleeps in proportion to the estimated tokens,
    records each text it computes, raises on a text containing ``fail_on``."""
    import threading
    import time

    import numpy as np

    from headfleet.engine.types import Filled

    lock = threading.Lock()

    def fill(keys, texts, namespaces):
        if fail_on is not None and any(fail_on in t for t in texts):
            raise RuntimeError("the backbone gave up on this piece")
        time.sleep(seconds_per_token * sum(estimate_tokens(t, 256) for t in texts))
        with lock:
            served.extend(texts)
        m = len(keys)
        return Filled(np.zeros((m, 4), np.float32), [None] * m, np.zeros(m, bool), np.ones(m, bool), [0] * m,
                      ([], np.zeros((0, 4), np.float32), []))

    return fill


def test_two_floods_at_once_share_the_backbone():
    """Two tenants flooding at the same time, each with 4 requests of 8 texts outstanding, get about
    equal shares of the computed texts: neither keeps pausing the other (a flood's lane is not freed
    before its batch ends, and a batch waits only for one of at most half its tokens)."""
    served: list[str] = []
    fill = _fake_fill(2e-4, served)
    target = 320

    async def scenario():
        sched = Scheduler(fill, lambda filled: None, max_length=256, batch_texts=64, batch_tokens=256,
                          tenant_queue_texts=1000, queue_texts=1000, yield_tokens=64)
        await sched.start()
        counter = iter(range(10**6))

        async def client(tenant: str, pad: str):
            while len(served) < target:
                n = next(counter)
                texts = [f"{tenant} {pad} request {n} text {j}" for j in range(8)]
                keys = [f"{tenant}{n}.{j}".encode().ljust(16, b"_") for j in range(8)]
                await sched.run(tenant, keys, texts, [f"tenant:{tenant}"] * 8)

        try:
            await asyncio.gather(*(client("a", "x" * 60) for _ in range(4)), *(client("c", "y" * 64) for _ in range(4)))
        finally:
            await sched.stop()

    asyncio.run(scenario())
    first = served[:target]
    shares = {t: sum(x.startswith(t + " ") for x in first) / len(first) for t in ("a", "c")}
    assert min(shares.values()) >= 1 / 3, shares


def test_a_failed_piece_fails_only_the_requests_still_waiting():
    """The backbone fails on a later piece of a batch: the request answered by an earlier piece
    keeps its answer, the flood's request gets the error, and nothing is left counted in flight."""
    from headfleet.errors import BackendError

    served: list[str] = []
    fill = _fake_fill(1e-5, served, fail_on="boom")

    async def scenario():
        sched = Scheduler(fill, lambda filled: None, max_length=256, batch_texts=64, batch_tokens=4096,
                          tenant_queue_texts=1000, queue_texts=1000, yield_tokens=48)
        await sched.start()
        try:
            texts = [f"tenant a sends message {i} about the invoices of the northern warehouse" for i in range(23)]
            texts.append("tenant a sends the boom message that the backbone cannot embed, about invoices")
            keys = [f"a{i}".encode().ljust(16, b"_") for i in range(len(texts))]
            flood = asyncio.ensure_future(sched.run("a", keys, texts, ["tenant:a"] * len(keys)))
            small = asyncio.ensure_future(sched.run("b", [b"b0".ljust(16, b"_")], ["bob: lunch?"], ["tenant:b"]))
            b = await small
            with pytest.raises(BackendError):
                await flood
            return sched, b
        finally:
            await sched.stop()

    sched, b = asyncio.run(scenario())
    assert b[0][b"b0".ljust(16, b"_")].computed and served[0] == "bob: lunch?"
    assert any(t.startswith("tenant a") for t in served)  # some of A's pieces ran before the failing one
    assert sched.in_flight == 0 and not sched._in_flight


def test_a_key_asked_by_a_flood_and_a_small_lane_is_computed_with_the_small_lane():
    """A text that a flood's lane asked first and a small lane (a shared namespace, or the same
    tenant's monitor) asks too goes in the batch's first piece, with the small lane: the small
    request does not wait for the flood's group."""
    from headfleet.service.scheduler import Work

    def work(lane: str, keys: list[bytes], cost: int) -> Work:
        return Work(lane, lane, keys, [k.decode() for k in keys], ["shared:x"] * len(keys), [cost] * len(keys),
                    None, 0.0)

    sched = Scheduler(lambda *a: None, lambda f: None, max_length=256, batch_texts=64, batch_tokens=4096,
                      tenant_queue_texts=1000, queue_texts=1000, yield_tokens=48)
    flood = work("a", [f"a{i}".encode() for i in range(10)] + [b"both"], 20)
    small = work("b", [b"both"], 20)
    rows = [(flood, i) for i in range(11)] + [(small, 0)]
    keys, groups, small_lanes = sched.order(rows)
    assert keys[0] == b"both" and groups[0] == 0 and small_lanes == {"b"}
    assert all(g != 0 for g in groups[1:])  # the flood's own keys: a group of their own, after
    assert sorted(keys) == sorted({w.keys[i] for w, i in rows})
