"""Publishing new versions under live traffic: a request keeps every version it resolved until it
completes, however long its uncached texts take to embed; retired versions leave memory after."""

from __future__ import annotations

import itertools
import threading
import time

import httpx

from headfleet.heads import examples_from_records

SPAM = ([(t, "spam") for t in ["WIN a free cruise now", "Claim your cash prize today", "Free gift card, reply YES",
                                "Cheap meds online", "URGENT: you won 1000 dollars", "Free entry in our prize draw"]]
        + [(t, "ham") for t in ["Lunch tomorrow?", "Home late tonight", "Send me the slides", "Happy birthday!",
                                 "The train is delayed", "Did you feed the cat?"]])


def test_versions_published_during_requests_never_fail_them(start_server):
    server = start_server(examples=False)
    engine = server.service.engine
    engine.train("default", "spam", examples_from_records(SPAM))
    counter = itertools.count()
    started: list[int] = []
    failures: list[str] = []
    versions: set[int] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while not stop.is_set():
                n = next(counter)
                started.append(n)
                texts = [f"never seen before, request {n} text {i}: please call me back" for i in range(20)]
                r = c.post("/classify", json={"texts": texts, "classifiers": ["spam"]})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    versions.update(x["classifications"]["spam"]["version"] for x in r.json()["results"])

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for seed in range(1, 9):  # eight new versions, each unloading the one before it, while requests embed
            seen = len(started)
            while len(started) < seen + 2 and all(t.is_alive() for t in threads):
                time.sleep(0.01)
            engine.train("default", "spam", examples_from_records(SPAM), seed=seed)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert failures == []
    assert len(started) >= 16 and len(versions) >= 3  # traffic ran across the publishes
    r = httpx.post(f"{server.url}/classify", json={"texts": ["one more"], "classifiers": ["spam"]}, timeout=60)
    assert r.json()["results"][0]["classifications"]["spam"]["version"] == 9
    loaded = {k for k in engine.fleet.keys() if k.startswith("default/spam@")}
    assert loaded == {"default/spam@9"}  # the retired versions were unloaded once released
