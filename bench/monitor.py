"""What monitoring costs: the request path, one window for a fleet, and Evidently beside it.

  (a) ``/classify`` p50 with and without monitoring, same server, same run: ``headfleet serve``
      (embedded defaults) in its own process, tenants ``mon`` and ``plain`` with the same 10
      classifiers; ``mon`` monitors all 10 (windows of 1,280 texts, so windows close and their
      signals run in the server during the timing). The same cached 64-text x 10-classifier
      request is sent alternately as ``mon`` and ``plain`` (one keep-alive connection each), and
      the monitor's windows are checked afterwards to prove it saw the traffic. Goal: <= 5 %.
  (b) one window's signals for N classifiers (default 1,000): N heads trained on different SMS
      subsets in one engine, each with a canary of 200 labelled texts; a full window (256 texts,
      half the classifiers on shifted traffic) is closed for each through the monitor's own path
      (reference profile already built, canary rescored through the cache, every signal, the
      stored window and the trigger check). Goal: <= 10 s on a 2-core CPU.
  (c) peer: Evidently's embedding-drift method (its model-based domain classifier, the method
      behind ``domain_auc``) on the same reference and window embeddings, run with
      ``--evidently-python`` (a venv where ``pip install evidently`` worked), on a subset of the
      classifiers and scaled to N (the scaling is printed).

    .venv/bin/python bench/monitor.py [--calls 200] [--classifiers 1000] [--evidently-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, begin, percentiles_ms, refuse, report, sms_labelled  # noqa: E402
from load import free_port, wait_ready  # noqa: E402

KEYS = {"mon": "bench-key-mon", "plain": "bench-key-plain"}


# -- (a) the request path ----------------------------------------------------------------------------
def request_overhead(calls: int) -> dict:
    from headfleet.engine import Engine
    from headfleet.heads import load_examples
    from headfleet.settings import Settings

    texts, _ = sms_labelled(64)
    files = sorted((REPO / "engine" / "example_data").glob("*.csv"))
    names = [f"c{i}" for i in range(10)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        with Engine.open(Settings(data_dir=data, device="cpu")) as engine:
            for i, name in enumerate(names):
                for tenant in KEYS:
                    engine.train(tenant, name, load_examples(files[i % len(files)]), seed=i)
        port = free_port()
        env = dict(os.environ, HEADFLEET_DATA_DIR=str(data), HEADFLEET_PORT=str(port), HEADFLEET_DEVICE="cpu",
                   HEADFLEET_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()))
        proc = subprocess.Popen([sys.executable, "-c", "from headfleet.service.cli import main; main()", "serve",
                                 "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            clients = {t: httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {k}"})
                       for t, k in KEYS.items()}
            for name in names:
                r = clients["mon"].put(f"/classifiers/{name}/monitor", json={"window_texts": 1280})
                assert r.status_code == 200, r.text
            body = {"texts": texts, "classifiers": names}
            samples: dict[str, list[float]] = {t: [] for t in KEYS}
            for t in KEYS:  # warm: fill the cache, load the heads
                for _ in range(3):
                    assert clients[t].post("/classify", json=body).status_code == 200
            for i in range(calls):
                for t in (("mon", "plain") if i % 2 else ("plain", "mon")):
                    t0 = time.perf_counter()
                    r = clients[t].post("/classify", json=body)
                    samples[t].append(time.perf_counter() - t0)
                    if r.status_code != 200 or r.json()["cache"]["computed"] != 0:
                        refuse(f"a timed request was not a cached 200 answer: {r.status_code} {r.text[:300]}")
            seen = clients["mon"].get(f"/classifiers/{names[0]}/monitor").json()
            plain = clients["plain"].get(f"/classifiers/{names[0]}/monitor").json()
        finally:
            proc.terminate()
            proc.wait(30)
    closed = sum(w["texts"] for w in seen["windows"])
    if closed < 1280 or plain["windows"]:
        refuse(f"the monitor did not see the traffic it was timed on ({closed} texts in closed windows)")
    return {"mon": percentiles_ms(samples["mon"]), "plain": percentiles_ms(samples["plain"]),
            "windows_closed": len(seen["windows"])}


# -- (b) one window for a fleet ------------------------------------------------------------------------
def fleet_window(n: int, evidently_python: str | None, evidently_n: int) -> dict:
    from headfleet.engine import Engine
    from headfleet.heads import examples_from_records
    from headfleet.lifecycle.feedback import Labelled
    from headfleet.lifecycle.monitor import Monitor
    from headfleet.lifecycle.settings import MonitorSettings
    from headfleet.lifecycle.store_file import FileStore
    from headfleet.lifecycle.windows import OpenWindow
    from headfleet.settings import Settings

    texts, labels = sms_labelled(3000)
    rng = np.random.default_rng(0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.open(Settings(data_dir=Path(tmp) / "data", device="cpu"))
        t0 = time.perf_counter()
        pool = engine.embed("bench", texts).vectors  # [rows, 384]: cached from here on
        mon = Monitor(engine, FileStore(Path(tmp) / "monitor"))
        settings = MonitorSettings(window_texts=256, consecutive=3)
        spam = np.flatnonzero(np.array(labels) == "spam")
        windows, refs = [], []
        for i in range(n):
            rows = rng.choice(len(texts), 300, replace=False)
            name = f"c{i}"
            manifest = engine.train("bench", name, examples_from_records(
                [{"text": texts[j], "label": labels[j]} for j in rows]), seed=i)
            mon.store.put(f"bench/{name}/settings", json.dumps(settings.to_dict()).encode())
            canary = rng.choice(len(texts), 200, replace=False)
            mon.book.set_canary("bench", name, Labelled([texts[j] for j in canary], [labels[j] for j in canary]), False)
            profile = mon.profile("bench", manifest)  # built once, when monitoring is enabled
            win = rng.choice(spam, 256) if i % 2 else rng.choice(len(texts), 256, replace=False)  # half shifted
            probs = engine.fleet.predict(pool[win], [f"bench/{name}@1"]).probs[:, 0, :2]
            w = OpenWindow.new(time.time() - 60, settings.reservoir, pool.shape[1])
            w.add([manifest["labels"][k] for k in probs.argmax(1)], probs.max(1), pool[win], rng)
            windows.append((name, manifest, w))
            refs.append((profile.vectors, pool[win]))
        out["setup_s"] = time.perf_counter() - t0
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):  # as Monitor.drain runs it
            t0 = time.perf_counter()
            mon.close_windows([("bench", name, manifest, settings, w, time.time()) for name, manifest, w in windows])
            out["close_s"] = time.perf_counter() - t0
        drift = [json.loads(mon.store.get(f"bench/{name}/v1/windows"))[-1]["drift"] for name, _, _ in windows]
        out["drifting"] = int(sum(drift))
        engine.close()
        if evidently_python:
            k = min(evidently_n, n)
            np.savez(Path(tmp) / "ev.npz", **{f"r{i}": refs[i][0] for i in range(k)},
                     **{f"c{i}": refs[i][1] for i in range(k)})
            res = subprocess.run([evidently_python, str(REPO / "bench" / "_evidently_drift.py"), str(Path(tmp) / "ev.npz"),
                                  str(k)], capture_output=True, text=True)
            if res.returncode != 0:
                out["evidently_error"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else str(res.returncode)
            else:
                out["evidently"] = json.loads(res.stdout.strip().splitlines()[-1])
    if out["drifting"] < n // 2 * 0.9:
        refuse(f"the shifted half was not flagged ({out['drifting']} of {n} drifting): the figure would not be the real path")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="requests per tenant in (a)")
    ap.add_argument("--classifiers", type=int, default=1000, help="N in (b)")
    ap.add_argument("--evidently-python", help="a Python with evidently installed, for the peer in (c)")
    ap.add_argument("--evidently-classifiers", type=int, default=3, help="classifiers Evidently runs on (scaled to N)")
    ap.add_argument("--skip-request", action="store_true")
    args = ap.parse_args()
    begin("monitoring cost")

    rows: list[tuple[str, str]] = []
    extra: dict = {}
    if not args.skip_request:
        a = request_overhead(args.calls)
        over = (a["mon"]["p50_ms"] - a["plain"]["p50_ms"]) / a["plain"]["p50_ms"]
        rows += [("(a) /classify 64 cached texts x 10, monitored", f"p50 {a['mon']['p50_ms']:.2f} ms, p99 {a['mon']['p99_ms']:.2f} ms"),
                 ("    same request, not monitored", f"p50 {a['plain']['p50_ms']:.2f} ms, p99 {a['plain']['p99_ms']:.2f} ms"),
                 ("    monitoring overhead (p50)", f"{over:+.1%}  (goal <= 5 %; {a['windows_closed']} windows closed "
                                                   "during the run)")]
        extra["request"] = a
    b = fleet_window(args.classifiers, args.evidently_python, args.evidently_classifiers)
    rows += [(f"(b) one window's signals, {args.classifiers} classifiers", f"{b['close_s']:.2f} s  "
              f"({b['close_s'] / args.classifiers * 1e3:.1f} ms each; goal <= 10 s; {b['drifting']} flagged drift, "
              f"setup {b['setup_s']:.0f} s not timed)")]
    if "evidently" in b:
        ev = b["evidently"]
        scaled = ev["seconds"] / ev["classifiers"] * args.classifiers
        rows += [(f"(c) Evidently {ev['version']} embedding drift (model method)",
                  f"{ev['seconds']:.2f} s for {ev['classifiers']} classifiers -> {scaled:.1f} s scaled to "
                  f"{args.classifiers}; drift found in {ev['drifting']} of {ev['classifiers']}"),
                 ("    ratio Evidently / headfleet (whole window vs its drift test alone)", f"{scaled / b['close_s']:.1f}x")]
    else:
        why = b.get("evidently_error", "no --evidently-python given")
        rows += [("(c) Evidently", f"not run: {why}")]
    extra["fleet"] = b
    report("monitoring cost", rows, extra)


if __name__ == "__main__":
    main()
