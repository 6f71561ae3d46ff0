"""The tiered cache end to end over real memory, FAISS and Redis tiers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import DIM, FP, keys_for, unit_vectors

from headfleet.cache import CacheStats, FaissStore, MemoryLRU, RedisTier, TieredCache


@pytest.fixture
def redis_tier(redis_server):
    t = RedisTier(redis_server.url, DIM, FP, ttl_s=60, prefix="test", retry_after_s=0.3)
    yield t
    t.close()


def build(redis_tier: RedisTier, local: FaissStore | None = None, stats: CacheStats | None = None) -> TieredCache:
    return TieredCache([MemoryLRU(1 << 20), local if local is not None else FaissStore(DIM, FP), redis_tier], stats)


def test_hits_come_from_the_fastest_tier_holding_them(redis_tier: RedisTier) -> None:
    keys, vecs, ns = keys_for(6), unit_vectors(6), ["ns"] * 6
    local = FaissStore(DIM, FP)
    cache = build(redis_tier, local)
    first = cache.lookup(keys, "t1", namespaces=ns)
    assert first.tiers == [None] * 6 and first.missing == list(range(6))

    cache.store(keys, vecs, ns)
    again = cache.lookup(keys, "t1", namespaces=ns)
    assert again.tiers == ["memory"] * 6
    np.testing.assert_array_equal(np.stack(again.vectors), vecs)

    # New process memory, same local store: served locally, then promoted to memory.
    cache2 = build(redis_tier, local)
    assert cache2.lookup(keys, "t1", namespaces=ns).tiers == ["local"] * 6
    assert len(cache2.tier("memory")) == 6
    assert cache2.lookup(keys, "t1", namespaces=ns).tiers == ["memory"] * 6

    # Another replica: fresh memory and local store, shared Redis; promoted to both above.
    cache3 = build(redis_tier)
    third = cache3.lookup(keys, "t1", namespaces=ns)
    assert third.tiers == ["redis"] * 6
    np.testing.assert_array_equal(np.stack(third.vectors), vecs)
    assert len(cache3.tier("memory")) == 6 and len(cache3.tier("local")) == 6
    assert cache3.lookup(keys, "t1", namespaces=ns).tiers == ["memory"] * 6
    assert cache3.tier("local").search(vecs[0], 1, "ns")[0][0] == keys[0]


def test_partial_hits_and_duplicates(redis_tier: RedisTier) -> None:
    keys, vecs = keys_for(3), unit_vectors(3)
    cache = build(redis_tier)
    cache.store(keys[:2], vecs[:2], ["ns"] * 2)
    asked = [keys[0], keys[2], keys[0], keys[1]]
    found = cache.lookup(asked, "t1", namespaces=["ns"] * 4)
    assert found.tiers == ["memory", None, "memory", "memory"]
    assert found.missing == [1]
    np.testing.assert_array_equal(found.vectors[2], vecs[0])


def test_lookup_without_namespaces_promotes_to_memory_only(redis_tier: RedisTier) -> None:
    keys, vecs = keys_for(2), unit_vectors(2)
    build(redis_tier).store(keys, vecs, ["ns"] * 2)
    cache = build(redis_tier)
    assert cache.lookup(keys, "t1").tiers == ["redis", "redis"]
    assert len(cache.tier("memory")) == 2
    assert len(cache.tier("local")) == 0 and cache.promotions_skipped == 2


def test_stats_per_tenant_and_classifier_are_isolated(redis_tier: RedisTier) -> None:
    stats = CacheStats()
    cache = build(redis_tier, stats=stats)
    keys, vecs = keys_for(4), unit_vectors(4)
    cache.store(keys[:3], vecs[:3], ["ns"] * 3)
    cache.lookup(keys, "tenant-a", ["spam", "legal"], ["ns"] * 4)
    stats.record_computed("tenant-a", 1)
    cache.lookup(keys[3:], "tenant-b", ["urgent"], ["ns"])

    a = stats.snapshot("tenant-a")
    assert a["lookups"] == 4 and a["misses"] == 1 and a["computed"] == 1
    assert a["hits"] == {"memory": 3, "local": 0, "redis": 0}
    assert a["hit_rate"] == pytest.approx(0.75)
    assert set(a["classifiers"]) == {"spam", "legal"}
    assert a["classifiers"]["spam"]["hits"]["memory"] == 3 and a["classifiers"]["legal"]["misses"] == 1

    b = stats.snapshot("tenant-b")
    assert set(b["classifiers"]) == {"urgent"}
    assert b["lookups"] == 1 and b["misses"] == 1 and b["computed"] == 0
    assert sum(b["hits"].values()) == 0
    nobody = stats.snapshot("tenant-c")
    assert nobody["lookups"] == 0 and nobody["classifiers"] == {}


def test_redis_outage_keeps_upper_tiers_working(redis_tier: RedisTier, redis_server) -> None:
    keys, vecs, ns = keys_for(4), unit_vectors(4), ["ns"] * 4
    local = FaissStore(DIM, FP)
    cache = build(redis_tier, local)
    cache.store(keys[:2], vecs[:2], ns[:2])
    redis_server.stop()

    found = cache.lookup(keys, "t1", namespaces=ns)  # no exception, Redis just misses
    assert found.tiers == ["memory", "memory", None, None]
    cache.store(keys[2:], vecs[2:], ns[2:])
    assert cache.lookup(keys, "t1", namespaces=ns).tiers == ["memory"] * 4
    assert build(redis_tier, local).lookup(keys, "t1", namespaces=ns).tiers == ["local"] * 4
    status = redis_tier.status()
    assert not status["healthy"] and status["errors"] >= 1

    redis_server.start()
    time.sleep(redis_tier.retry_after_s + 0.05)
    cache.store(keys, vecs, ns)  # writes go through again
    assert redis_tier.status()["healthy"] and redis_tier.status()["recoveries"] >= 1
    assert build(redis_tier).lookup(keys, "t1", namespaces=ns).tiers == ["redis"] * 4


def test_a_failing_tier_does_not_stop_the_others(redis_tier: RedisTier) -> None:
    wrong_width = FaissStore(DIM * 2, FP)  # rejects every DIM-wide write
    cache = TieredCache([MemoryLRU(1 << 20), wrong_width, redis_tier])
    keys, vecs = keys_for(2), unit_vectors(2)
    cache.store(keys, vecs, ["ns"] * 2)
    assert cache.tier_errors["local"] == 1
    fresh = TieredCache([MemoryLRU(1 << 20), redis_tier])
    assert fresh.lookup(keys, "t1").tiers == ["redis", "redis"]


def test_close_saves_the_local_store(redis_tier: RedisTier, tmp_path: Path) -> None:
    path = tmp_path / "local.npz"
    keys, vecs = keys_for(3), unit_vectors(3)
    cache = build(redis_tier, FaissStore(DIM, FP, path))
    cache.store(keys, vecs, ["ns"] * 3)
    sizes = cache.nbytes()
    assert set(sizes) == {"memory", "local", "redis"} and sizes["memory"] > 0 and sizes["local"] > 0
    cache.close()
    reloaded = FaissStore(DIM, FP, path)
    np.testing.assert_array_equal(np.stack(reloaded.get_many(keys)), vecs)


def test_malformed_store_raises_instead_of_being_swallowed(redis_tier: RedisTier) -> None:
    cache = build(redis_tier)
    with pytest.raises(ValueError, match="vectors must be float32, got float64"):
        cache.store(keys_for(2), unit_vectors(2).astype(np.float64), ["ns"] * 2)
    with pytest.raises(ValueError, match=r"keys \(2\), vectors \(3\) and namespaces \(2\) differ in length"):
        cache.store(keys_for(2), unit_vectors(3), ["ns"] * 2)
    assert all(n == 0 for n in cache.tier_errors.values())
