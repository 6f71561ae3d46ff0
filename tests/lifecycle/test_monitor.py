"""The monitor on a real engine: windows by count and by time, replicas that add up through one
store (real Redis), webhooks to a real HTTP receiver, and traffic that must not count."""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest

from headfleet.engine import Engine
from headfleet.heads import examples_from_records
from headfleet.lifecycle.monitor import Monitor
from headfleet.lifecycle.store_file import FileStore
from headfleet.lifecycle.store_redis import RedisStore
from headfleet.settings import Settings

TRAIN = [("win a free prize now, text CLAIM", "spam"), ("urgent! your account won cash, call now", "spam"),
         ("free entry to win a holiday, reply YES", "spam"), ("claim your free ringtone today", "spam"),
         ("are we still on for lunch?", "ham"), ("see you at the station at six", "ham"),
         ("can you send me the notes from class", "ham"), ("mum says dinner is at eight", "ham"),
         ("running late, start without me", "ham"), ("thanks for yesterday, it was fun", "ham")] * 3
TEXTS = [f"message number {i} about lunch plans" for i in range(40)]


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def engine(minilm, tmp_path):
    eng = Engine.open(Settings(data_dir=tmp_path / "data", device="cpu", faiss_store=False), minilm)
    eng.train("acme", "spam", examples_from_records([{"text": t, "label": lab} for t, lab in TRAIN]))
    yield eng
    eng.close()


def test_count_windows_close_exactly_and_only_classify_traffic_counts(engine, tmp_path):
    mon = Monitor(engine, FileStore(tmp_path / "mon")).attach()
    mon.configure("acme", "spam", {"window_texts": 15})
    seen = []
    engine.scored_hooks.append(seen.append)
    engine.classify("acme", TEXTS[:20], ["spam"])  # 20 texts: one window of 15, 5 left open
    engine.classify("acme", TEXTS[20:32], ["spam"])  # 17 -> a second window of 15, 2 open
    # the same answers as a scoring job's chunks, or as another tenant's, are not live traffic here
    for s in seen:
        mon.observe(s._replace(source="job"))
        mon.observe(s._replace(tenant="other"))
    report = mon.report("acme", "spam")
    assert [w["texts"] for w in report["windows"]] == [15, 15]
    assert all(w["label_psi"] is not None and w["domain_auc"] is not None for w in report["windows"])
    assert all(w["canary_accuracy"] is None and w["accuracy_drop"] is False for w in report["windows"])
    mon.close()


def test_time_windows_close_when_their_time_is_up(engine, tmp_path):
    clock = Clock()
    mon = Monitor(engine, FileStore(tmp_path / "mon"), clock=clock).attach()
    mon.configure("acme", "spam", {"window_seconds": 60})
    engine.classify("acme", TEXTS[:12], ["spam"])
    clock.t += 30
    assert mon.report("acme", "spam")["windows"] == []  # still open
    engine.classify("acme", TEXTS[12:20], ["spam"])
    clock.t += 31
    windows = mon.report("acme", "spam")["windows"]
    assert [w["texts"] for w in windows] == [20]
    assert windows[0]["end"] > windows[0]["start"]
    mon.close()


def test_two_replicas_add_up_in_one_redis_store(engine, redis_server):
    """Replica a sees 20 texts, then replica b (another process in production) sees 20: one
    window of 30 closes from both, the other 10 wait in the shared open window."""
    a = Monitor(engine, RedisStore(redis_server.url, "t1")).attach()
    a.configure("acme", "spam", {"window_texts": 30})
    engine.classify("acme", TEXTS[:20], ["spam"])
    a.drain()
    a.close()  # detaches a's hook
    b = Monitor(engine, RedisStore(redis_server.url, "t1")).attach()  # learns the settings from the store
    engine.classify("acme", TEXTS[20:40], ["spam"])
    b.drain()
    assert [w["texts"] for w in b.report("acme", "spam")["windows"]] == [30]
    assert b.store.get("acme/spam/v1/open") is not None
    b.close()


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alerts_reach_the_webhook_and_a_dead_one_is_counted(engine, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    mon = Monitor(engine, FileStore(tmp_path / "mon")).attach()
    mon.webhooks.backoff_s = 0.01
    mon.configure("acme", "spam", {"window_texts": 20, "webhook": url, "psi": 0.0})  # every window drifts
    engine.classify("acme", TEXTS[:20], ["spam"])
    mon.report("acme", "spam")
    mon.webhooks.join()
    assert [(p["classifier"], p["kind"]) for p in _Receiver.got] == [("spam", "drift")]
    server.shutdown()
    server.server_close()
    engine.classify("acme", TEXTS[20:40], ["spam"])  # the receiver is gone now
    mon.report("acme", "spam")
    mon.webhooks.join()
    assert mon.summary()["webhook_failures"] == 1 and len(_Receiver.got) == 1
    mon.close()


def test_reference_profile_reads_the_versions_own_holdout(engine, tmp_path):
    """The confidence reference is the holdout training measured the version on: the same rows
    (the same split and seed), so its size is the manifest's n_holdout."""
    mon = Monitor(engine, FileStore(tmp_path / "mon"))
    manifest = engine.registry.resolve("acme", "spam")
    profile = mon.profile("acme", manifest)
    assert len(profile.confidences) == manifest["metrics"]["n_holdout"] > 0
    assert profile.training_dist == {"ham": 0.6, "spam": 0.4}
    said = [r["classifications"]["spam"]["label"] for r in engine.classify("acme", [t for t, _ in TRAIN], ["spam"])["results"]]
    assert profile.label_dist == {lab: said.count(lab) / len(said) for lab in sorted(set(said))}  # its own predictions
    assert profile.holdout_accuracy == manifest["metrics"]["accuracy"]
    assert profile.vectors.shape == (len(TRAIN), engine.embedder.dim)
    again = Monitor(engine, FileStore(tmp_path / "mon")).profile("acme", manifest)  # read back from the store
    np.testing.assert_array_equal(again.vectors, profile.vectors)


def test_a_time_window_another_replica_left_open_is_closed(engine, tmp_path):
    """Replica a opens a window and stops; replica b finds it in the store and closes it when its
    time is up. Traffic that arrives after a window's time closes it first, then opens the next."""
    clock = Clock()
    store = FileStore(tmp_path / "mon")
    a = Monitor(engine, store, clock=clock).attach()
    a.configure("acme", "spam", {"window_seconds": 60})
    engine.classify("acme", TEXTS[:12], ["spam"])
    a.drain()
    a.close()
    b = Monitor(engine, FileStore(tmp_path / "mon"), clock=clock).attach()
    b.drain()
    assert b.report("acme", "spam")["windows"] == []
    clock.t += 61
    assert [w["texts"] for w in b.report("acme", "spam")["windows"]] == [12]
    engine.classify("acme", TEXTS[12:20], ["spam"])  # a new window from here
    b.drain()
    clock.t += 120
    engine.classify("acme", TEXTS[20:25], ["spam"])
    windows = b.report("acme", "spam")["windows"]
    assert [w["texts"] for w in windows] == [12, 8]  # the 8 closed by the late traffic; the 5 are open
    b.close()
