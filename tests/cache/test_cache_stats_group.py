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


def test_the_1m_and_5m_windows_slide_across_the_minute_boundary():
    """"1m" is the last 50-60 s whatever the second of the minute: a lookup 20 s ago counts after the
    calendar minute turned (the report once showed only the current minute, so at hh:mm:02 it held
    2 s of traffic), and a lookup 75 s ago has left it; the same holds through a peer's export."""
    minute = 60 * 16_667  # a minute's start, in epoch seconds
    clock = Clock(minute + 50.0)
    stats, peer = CacheStats(clock), CacheStats(clock)
    stats.record("acme", ["spam"], [None, "memory"])
    peer.record("acme", ["spam"], ["local"])
    clock.t = minute + 70.0  # 20 s later, in the next calendar minute
    snap = stats.snapshot("acme", [peer.export()["acme"]])
    assert snap["windows"]["1m"]["lookups"] == 3 and snap["windows"]["1m"]["hits"]["local"] == 1
    clock.t = minute + 125.0  # 75 s after them: out of "1m", still in "5m" and "1h"
    stats.record("acme", ["spam"], ["memory"])
    w = stats.snapshot("acme")["windows"]
    assert (w["1m"]["lookups"], w["5m"]["lookups"], w["1h"]["lookups"]) == (1, 3, 3)
    clock.t = minute + 50.0 + 301  # just over 5 minutes after the first: only the later lookup is in "5m"
    w = stats.snapshot("acme")["windows"]
    assert (w["5m"]["lookups"], w["1h"]["lookups"]) == (1, 3)
    assert stats.snapshot("acme")["lookups"] == 3  # since start: nothing leaves it


def test_a_peer_of_an_older_version_without_fine_buckets_still_counts_in_every_window():
    """During a rolling upgrade a peer's export has minute buckets only: its lookups still reach
    "1m" and "5m" (placed at their minute's start), not "1h" alone."""
    minute = 60 * 16_667
    clock = Clock(minute + 30.0)
    stats, peer = CacheStats(clock), CacheStats(clock)
    peer.record("acme", ["spam"], ["memory", None])
    old = peer.export()["acme"]
    del old["fine"]
    clock.t = minute + 45.0
    w = stats.snapshot("acme", [old])["windows"]
    assert (w["1m"]["lookups"], w["5m"]["lookups"], w["1h"]["lookups"]) == (2, 2, 2)
