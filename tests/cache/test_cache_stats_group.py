"""Cache figures of several processes added up (``serve --workers``, Ray replicas): what one process
exports, another merges into the tenant's report, minute windows included, and only that tenant's."""

from __future__ import annotations

import json

from headfleet.cache import CacheStats


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_peer_s_figures_add_to_the_report_window_by_window_and_only_for_their_tenant():
    clock = Clock(1_000_000.0)
    mine, peer = CacheStats(clock), CacheStats(clock)
    mine.record("acme", ["spam"], ["memory", None])
    mine.record_computed("acme", 1)
    peer.record("acme", ["spam", "legal"], ["local", "memory", None])
    peer.record_computed("acme", 1)
    peer.record("bob", ["x"], [None])
    clock.t += 30 * 60  # half an hour later: the first minutes leave the 1m and 5m windows
    peer.record("acme", ["spam"], ["memory"])

    exported = json.loads(json.dumps(peer.export()))  # what travels through the run folder
    assert set(exported) == {"acme", "bob"}
    assert peer.export() == {}  # nothing changed since
    snap = mine.snapshot("acme", [exported["acme"]])
    assert snap["lookups"] == 6 and snap["misses"] == 2 and snap["computed"] == 2
    assert snap["hits"]["memory"] == 3 and snap["hits"]["local"] == 1
    assert snap["classifiers"]["spam"]["lookups"] == 6 and snap["classifiers"]["legal"]["lookups"] == 3
    assert snap["fanout_saved"] == 3  # the peer's two-classifier request shared 3 embeddings
    assert snap["windows"]["1m"]["lookups"] == 1 and snap["windows"]["1h"]["lookups"] == 6
    assert mine.snapshot("acme")["lookups"] == 2  # merging never changes this process's own counters
    alone = mine.snapshot("bob", [exported["bob"]])
    assert alone["lookups"] == 1 and "spam" not in alone["classifiers"]
