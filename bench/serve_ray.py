"""headfleet on Ray Serve against single-process ``headfleet serve``, same run, same data folder.

Contenders, each started as its user starts it (``headfleet serve`` in a subprocess, with the
same keys and classifiers), one at a time, the others stopped:

  single      ``headfleet serve``                                   (the peer)
  ray x1      ``headfleet serve --ray --replicas 1``                Ray's proxy hop added
  ray x2      ``headfleet serve --ray --replicas 2``                two replicas, round-robin-ish
  ray x2 aff  ``headfleet serve --ray --replicas 2 --affinity``     the router in front

Phases (``bench/load.py``'s client: keep-alive HTTP/1.1 on asyncio streams, bounded by a request
count and a time limit): (a) cached, one text x the classifiers, the same text every time, N
connections; (b) uncached, a text never seen before per request, ``--low-concurrency``
connections. Then the memory-tier hit rate of ray x2 with and without affinity: single-text
requests drawn from a pool of ``--pool`` distinct texts, ``--hit-requests`` of them, after one
pass over the pool: the share answered from the replica's memory tier (the local store is off
for this, so a memory miss is a forward, as it would be across machines).

Checked before any timing: every contender labels the same 64 SMS texts x every classifier as
the single process does, scores within 1e-5 (the vectors agree within 1e-6, as the tests check;
a softmax of a different batch's float sums moves a score by about that much); otherwise nothing
is timed (exit 2). Each figure is
printed with the load average when its phase ended. On 2 cores, expect no speed-up from 2
replicas: the point is the overhead (goal <= 15 % on the uncached path at 1 replica).

    .venv/bin/python bench/serve_ray.py [--seconds 10] [--connections 16] [--per-replica-rps R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, check_close, check_labels, refuse, report, sms_texts  # noqa: E402
from load import KEYS, Phase, bodies, free_port, train_classifiers, wait_ready  # noqa: E402

TITLE = "headfleet on Ray Serve vs single-process headfleet serve (loopback)"


def start(data_dir: Path, port: int, ray_args: list[str], cores: int, local_store: bool = True) -> subprocess.Popen:
    """``headfleet serve`` (``ray_args``: ``--ray ...``) with the bench's keys, in its own process group."""
    env = dict(os.environ, HEADFLEET_DATA_DIR=str(data_dir), HEADFLEET_PORT=str(port), HEADFLEET_DEVICE="cpu",
               HEADFLEET_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()),
               HEADFLEET_FAISS_STORE="1" if local_store else "0",
               RAY_object_store_memory=str(100 * 2**20), RAY_DEDUP_LOGS="1")
    if ray_args:  # every replica gets an equal share of the cores, and as many torch threads
        replicas = int(ray_args[ray_args.index("--replicas") + 1])
        share = max(1, cores // replicas)
        ray_args = ray_args + ["--ray-cpus", str(share)]
        env["HEADFLEET_THREADS"] = str(share)
    return subprocess.Popen([sys.executable, "-c", "from headfleet.service.cli import main; main()", "serve",
                             "--log-level", "warning", *ray_args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C (``serve --ray`` deletes its application and shuts its Ray down), then the group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def answers(port: int, classifiers: list[str]) -> tuple[list[str], list[float]]:
    """Labels and scores of 64 SMS texts x ``classifiers``, as tenant a."""
    r = httpx.post(f"http://127.0.0.1:{port}/classify", json={"texts": sms_texts(64), "classifiers": classifiers},
                   headers={"Authorization": f"Bearer {KEYS['a']}"}, timeout=300)
    if r.status_code != 200:
        refuse(f"port {port} answered {r.status_code} to the check request: {r.text[:300]}")
    labels, scores = [], []
    for res in r.json()["results"]:
        for c in classifiers:
            entry = res["classifications"][c]
            labels.append(entry["label"])
            scores.extend(entry["scores"][k] for k in sorted(entry["scores"]))
    return labels, scores


def hit_rate(port: int, classifier: str, pool: int, requests: int, seed: int) -> dict:
    """Memory-tier hits over single-text requests drawn from ``pool`` texts, after one pass over them."""
    texts = [f"{t} [pool {seed}.{i}]" for i, t in enumerate(sms_texts(pool))]
    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {KEYS['a']}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=auth) as c:
        for t in texts:  # every text computed once somewhere
            c.post("/classify", json={"texts": [t], "classifiers": [classifier]}).raise_for_status()
        time.sleep(2)  # what a replica holds reaches the router's view of the buckets
        hits = 0
        for _ in range(requests):
            r = c.post("/classify", json={"texts": [rng.choice(texts)], "classifiers": [classifier]})
            r.raise_for_status()
            hits += r.json()["cache"]["hits"]["memory"]
    return {"memory_hits": hits, "requests": requests, "rate": hits / requests}


def load_now() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


async def phases(port: int, classifiers: list[str], args, tag: str) -> dict:
    warm = Phase(port, KEYS["a"], bodies(1, classifiers, False, ""), 1, 20, 30)
    await warm.run()
    out = {}
    cached = await Phase(port, KEYS["a"], bodies(1, classifiers, False, ""), args.connections, args.max_requests,
                         args.seconds).run()
    out["cached"] = {**cached.summary(), "load": load_now()}
    uncached = await Phase(port, KEYS["a"], bodies(1, classifiers, True, f"{tag}-u"), args.low_concurrency,
                           args.max_requests, args.seconds).run()
    out["uncached"] = {**uncached.summary(), "load": load_now()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="time limit per phase")
    ap.add_argument("--max-requests", type=int, default=50_000, help="request limit per phase")
    ap.add_argument("--connections", type=int, default=16, help="connections for the cached phase")
    ap.add_argument("--low-concurrency", type=int, default=2, help="connections for the uncached phase")
    ap.add_argument("--classifiers", type=int, default=5)
    ap.add_argument("--pool", type=int, default=200, help="distinct texts of the hit-rate phase")
    ap.add_argument("--hit-requests", type=int, default=400, help="requests of the hit-rate phase")
    ap.add_argument("--per-replica-rps", type=float, default=None,
                    help="a per-replica uncached req/s measured on a GPU replica, for the plan on paper")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    begin(TITLE)

    contenders = {"single": [], "ray x1": ["--ray", "--replicas", "1"], "ray x2": ["--ray", "--replicas", "2"],
                  "ray x2 aff": ["--ray", "--replicas", "2", "--affinity"]}
    results: dict[str, dict] = {}
    checked: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        names = train_classifiers(Path(tmp), args.classifiers)
        want = None
        for label, ray_args in contenders.items():
            port = free_port()
            proc = start(Path(tmp), port, ray_args, cores)
            try:
                wait_ready(f"http://127.0.0.1:{port}", proc, timeout=600)
                got = answers(port, names)
                if want is None:
                    want = got
                else:
                    checked.append(check_labels(f"{label} vs single", got[0], want[0], 1.0))
                    checked.append(check_close(f"{label} vs single, scores", got[1], want[1], 1e-5))
                print(f"{label}: up and checked ({load_now()})", flush=True)
                results[label] = asyncio.run(phases(port, names, args, label.replace(" ", "")))
            finally:
                stop(proc)
        for label in ("ray x2", "ray x2 aff"):  # memory-tier hit rate, no local store behind it
            port = free_port()
            proc = start(Path(tmp), port, contenders[label], cores, local_store=False)
            try:
                wait_ready(f"http://127.0.0.1:{port}", proc, timeout=600)
                results[label]["hits"] = {**hit_rate(port, names[0], args.pool, args.hit_requests, seed=7),
                                          "load": load_now()}
            finally:
                stop(proc)

    def fmt(s: dict) -> str:
        return (f"{s['req_per_s']:8.1f} req/s  p99 {s.get('p99_ms', float('nan')):7.2f} ms  "
                f"(n={s['n']}; statuses {s['statuses']}; {s['load']})")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}x" if b else "no ratio"

    rows = []
    for phase, title in (("cached", f"(a) cached, 1 text x {args.classifiers}, {args.connections} conns"),
                         ("uncached", f"(b) uncached, 1 text x {args.classifiers}, {args.low_concurrency} conns")):
        for label in contenders:
            rows.append((f"{title}: {label}", fmt(results[label][phase])))
        base = results["single"][phase]
        for label in ("ray x1", "ray x2", "ray x2 aff"):
            s = results[label][phase]
            if not s.get("n") or not base.get("n"):
                rows.append((f"{title}: {label} / single", "no ratio: a phase got no 200 answer"))
                continue
            over = (base["req_per_s"] / s["req_per_s"] - 1) * 100 if s["req_per_s"] else float("inf")
            goal = "  (goal <= 15 % at 1 replica)" if phase == "uncached" and label == "ray x1" else ""
            rows.append((f"{title}: {label} / single",
                         f"req/s {ratio(s['req_per_s'], base['req_per_s'])}, p99 {ratio(s['p99_ms'], base['p99_ms'])};"
                         f" overhead {over:+.1f} %{goal}"))
    for label in ("ray x2", "ray x2 aff"):
        h = results[label]["hits"]
        rows.append((f"memory-tier hit rate, {args.pool} texts, {label}",
                     f"{h['rate']:.1%} ({h['memory_hits']}/{h['requests']}; {h['load']})"))
    plain, aff = results["ray x2"]["hits"]["rate"], results["ray x2 aff"]["hits"]["rate"]
    rows.append(("memory-tier hit rate, affinity / without", ratio(aff, plain)))
    # the plan on paper: N replicas from the per-replica uncached figure measured here (or given)
    per = args.per_replica_rps or results["ray x1"]["uncached"]["req_per_s"]
    scale = results["ray x2"]["uncached"]["req_per_s"] / (2 * per) if per else 0.0
    source = "given (--per-replica-rps)" if args.per_replica_rps else "ray x1 uncached, this machine"
    for n in (1, 4, 16, 64):
        rows.append((f"PLAN ON PAPER, not measured: {n} replicas, uncached",
                     f"~{n * per:,.0f} req/s = {n} x {per:.1f} req/s per replica ({source}); "
                     f"2-replica efficiency here {scale:.2f} (on {cores} cores: shared CPUs, not a cluster)"))
    rows += [("checked before timing", line) for line in checked]
    report(TITLE, rows, {"args": vars(args), "cores": cores, **{k: v for k, v in results.items()}})
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
