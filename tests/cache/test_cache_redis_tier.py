"""The Redis tier: round trips, corrupt values, and surviving a Redis outage."""

from __future__ import annotations

import os
import signal
import struct
import time

import numpy as np
import pytest
import redis
from cache_helpers import DIM, FP, keys_for, unit_vectors

from headfleet.cache import CORRUPT, CacheStats, MemoryLRU, RedisTier, TieredCache
from headfleet.cache.redis_codec import encode, fingerprint_tag


@pytest.fixture
def tier(redis_server):
    t = RedisTier(redis_server.url, DIM, FP, ttl_s=60, prefix="test", retry_after_s=0.3)
    yield t
    t.close()


def test_round_trip_with_ttl(tier: RedisTier, redis_server) -> None:
    keys, vecs = keys_for(5), unit_vectors(5)
    tier.put_many(keys, vecs, ["ns"] * 5)
    got = tier.get_many(keys + keys_for(1, tag="absent"))
    np.testing.assert_array_equal(np.stack(got[:5]), vecs)
    assert got[5] is None
    raw = redis.Redis.from_url(redis_server.url)
    assert 0 < raw.ttl(tier.redis_key(keys[0])) <= 60
    assert tier.ping() and tier.status()["healthy"]


def garbage(vec: np.ndarray) -> bytes:
    return b"\x00not a vector"


def other_backbone(vec: np.ndarray) -> bytes:
    return encode(vec, fingerprint_tag("some-other-backbone"))


def truncated(vec: np.ndarray) -> bytes:
    return encode(vec, fingerprint_tag(FP))[:-4]


def wrong_dim_header(vec: np.ndarray) -> bytes:
    good = encode(vec, fingerprint_tag(FP))
    return good[:4] + struct.pack("<I", DIM + 1) + good[8:]


def wrong_magic(vec: np.ndarray) -> bytes:
    return b"XXXX" + encode(vec, fingerprint_tag(FP))[4:]


@pytest.mark.parametrize("damage", [garbage, other_backbone, truncated, wrong_dim_header, wrong_magic])
def test_corrupt_value_is_a_counted_miss_and_store_repairs_it(tier: RedisTier, redis_server, damage) -> None:
    keys, vecs = keys_for(2), unit_vectors(2)
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(tier.redis_key(keys[0]), damage(vecs[0]))
    assert tier.get_many(keys[:1]) == [CORRUPT]

    stats = CacheStats()
    cache = TieredCache([MemoryLRU(1 << 20), tier], stats)
    found = cache.lookup(keys, "t1", ["spam"], ["ns", "ns"])
    assert found.vectors == [None, None] and found.tiers == [None, None]
    assert found.corrupt == 1
    assert stats.snapshot("t1")["corrupt"] == 1
    assert stats.snapshot("t1")["classifiers"]["spam"]["corrupt"] == 1
    assert tier.status()["corrupt"] == 2

    cache.store(keys, vecs, ["ns", "ns"])
    fresh = TieredCache([MemoryLRU(1 << 20), tier]).lookup(keys, "t1")
    assert fresh.tiers == ["redis", "redis"] and fresh.corrupt == 0
    np.testing.assert_array_equal(np.stack(fresh.vectors), vecs)


def test_outage_is_survived_and_recovered(tier: RedisTier, redis_server) -> None:
    keys, vecs = keys_for(4), unit_vectors(4)
    tier.put_many(keys[:2], vecs[:2], ["ns"] * 2)
    redis_server.stop()

    assert tier.get_many(keys) == [None] * 4
    status = tier.status()
    assert status["healthy"] is False and status["errors"] == 1 and status["last_error"]

    # Within the back-off window Redis is not contacted at all.
    tier.put_many(keys[2:], vecs[2:], ["ns"] * 2)
    assert tier.get_many(keys) == [None] * 4
    assert tier.status()["errors"] == 1 and tier.status()["skipped"] == 2
    assert tier.status()["dropped_writes"] == 2
    assert not tier.ping()  # a probe ignores the window and reports the truth

    redis_server.start()  # same port, empty (no persistence)
    time.sleep(tier.retry_after_s + 0.05)
    tier.put_many(keys, vecs, ["ns"] * 4)
    status = tier.status()
    assert status["healthy"] is True and status["recoveries"] == 1
    np.testing.assert_array_equal(np.stack(tier.get_many(keys)), vecs)


def test_stalled_redis_costs_one_timeout_then_is_skipped(tier: RedisTier, redis_server) -> None:
    keys, vecs = keys_for(2), unit_vectors(2)
    tier.put_many(keys, vecs, ["ns"] * 2)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        assert tier.get_many(keys) == [None, None]  # answered by the socket timeout, not hung
        assert "Timeout" in tier.status()["last_error"]
        assert tier.get_many(keys) == [None, None]
        assert tier.status()["errors"] == 1 and tier.status()["skipped"] == 1
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    time.sleep(tier.retry_after_s + 0.05)
    np.testing.assert_array_equal(np.stack(tier.get_many(keys)), vecs)
    assert tier.status()["healthy"] and tier.status()["recoveries"] == 1


def test_restart_between_calls_is_not_an_outage(tier: RedisTier, redis_server) -> None:
    keys, vecs = keys_for(2), unit_vectors(2)
    tier.put_many(keys, vecs, ["ns"] * 2)  # leaves a pooled connection to the old process
    redis_server.stop()
    redis_server.start()
    tier.put_many(keys, vecs, ["ns"] * 2)  # the stale connection is replaced, not reported
    assert tier.status()["errors"] == 0 and tier.status()["healthy"]
    np.testing.assert_array_equal(np.stack(tier.get_many(keys)), vecs)
