"""The in-process LRU stays inside its byte budget and evicts the least recently used."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import ENTRY, keys_for, unit_vectors

from headfleet.cache import MemoryLRU


def test_evicts_oldest_and_get_refreshes() -> None:
    lru = MemoryLRU(max_bytes=3 * ENTRY)
    keys, vecs = keys_for(4), unit_vectors(4)
    lru.put_many(keys[:3], vecs[:3], ["ns"] * 3)
    assert lru.get_many([keys[0]])[0] is not None  # key 0 becomes most recent
    lru.put_many(keys[3:], vecs[3:], ["ns"])
    assert keys[1] not in lru  # the least recently used went
    assert all(k in lru for k in (keys[0], keys[2], keys[3]))
    assert lru.evictions == 1
    assert lru.nbytes() == 3 * ENTRY


def test_never_exceeds_budget() -> None:
    budget = 5 * ENTRY + ENTRY // 2
    lru = MemoryLRU(max_bytes=budget)
    keys, vecs = keys_for(50), unit_vectors(50)
    for i in range(0, 50, 7):
        chunk = keys[i : i + 7]
        lru.put_many(chunk, vecs[i : i + 7], ["ns"] * len(chunk))
        assert lru.nbytes() <= budget
    assert len(lru) == 5
    # the survivors are the five most recent and read back exactly
    for got, want in zip(lru.get_many(keys[-5:]), vecs[-5:]):
        np.testing.assert_array_equal(got, want)
    assert lru.get_many(keys[:1]) == [None]


def test_replacing_a_key_does_not_double_count() -> None:
    lru = MemoryLRU(max_bytes=10 * ENTRY)
    keys = keys_for(1)
    a, b = unit_vectors(2)
    lru.put_many(keys, a[None], ["ns"])
    lru.put_many(keys, b[None], ["ns"])
    assert len(lru) == 1 and lru.nbytes() == ENTRY
    np.testing.assert_array_equal(lru.get_many(keys)[0], b)


def test_entry_larger_than_budget_is_rejected_and_counted() -> None:
    lru = MemoryLRU(max_bytes=ENTRY - 1)
    lru.put_many(keys_for(1), unit_vectors(1), ["ns"])
    assert len(lru) == 0 and lru.nbytes() == 0 and lru.rejected == 1


def test_caller_mutation_does_not_reach_the_cache() -> None:
    lru = MemoryLRU(max_bytes=10 * ENTRY)
    keys, vecs = keys_for(2), unit_vectors(2)
    expected = vecs.copy()
    lru.put_many(keys, vecs, ["ns", "ns"])
    vecs[:] = 0
    for got, want in zip(lru.get_many(keys), expected):
        np.testing.assert_array_equal(got, want)
        with pytest.raises(ValueError, match="read-only"):
            got[0] = 1.0  # served vectors are read-only


def test_rejects_non_float32() -> None:
    lru = MemoryLRU(max_bytes=10 * ENTRY)
    with pytest.raises(ValueError, match="vectors must be float32, got float64"):
        lru.put_many(keys_for(1), unit_vectors(1).astype(np.float64), ["ns"])
