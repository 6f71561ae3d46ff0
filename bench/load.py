"""Load generator on loopback: headfleet's HTTP service against a naive server, same run.

Starts ``headfleet serve`` (two tenants, a and b, each with the same 5 classifiers trained from
the example files; embedded defaults: the default backbone of a new data folder, memory + local
store, no Redis) and the peer
``bench/naive_server.py`` (sentence-transformers ``encode`` + scikit-learn ``predict_proba``
per request), each in its own process, then drives both with a keep-alive HTTP/1.1 client
written on asyncio streams (one process, so the client costs as little as it can). Every phase
is bounded by a request count and a time limit.

  (a) cached: one text x 5 classifiers, the same text every time, N connections
  (b) uncached: one short text never seen before x 5 classifiers, low concurrency
  (c) fairness: tenant B's single-text requests while tenant A floods with 32-text requests,
      against B alone

Both servers are started first and checked before either is timed: the same 64 SMS texts x every
classifier must get a label from each, and the two must agree on at least 90 % of the labels
(they fit their heads on the same examples and the same vectors, with different fitting code);
headfleet must answer a repeat from its memory tier and compute a new text (what phases a and b
claim to measure). Otherwise no figure is printed. Throughput and latency count only 200 answers;
every other status is counted beside them.

    .venv/bin/python bench/load.py [--seconds 10] [--connections 16] [--skip-peer] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, begin, check_labels, percentiles_ms, refuse, report, sms_texts  # noqa: E402

KEYS = {"a": "bench-key-a", "b": "bench-key-b"}


# -- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def wait_workers(port: int, workers: int, timeout: float = 300) -> None:
    """Until every worker has started (``/stats`` counts the processes that report)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"http://127.0.0.1:{port}/stats", headers={"Authorization": f"Bearer {KEYS['a']}"},
                    timeout=10).json().get("processes", 1) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers did not all start")
        time.sleep(0.5)


def train_classifiers(data_dir: Path, n: int) -> list[str]:
    """The same n classifiers for tenants a and b, trained in this process before the server starts."""
    from headfleet.heads import load_examples
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    files = sorted((REPO / "engine" / "example_data").glob("*.csv"))
    names = []
    # from_env: the backbone a new data folder gets by default (or HEADFLEET_BACKEND's), recorded
    # in the folder, so the service started on it next serves the same one
    with Engine.open(Settings.from_env(data_dir=data_dir, device="cpu")) as engine:
        for i in range(n):
            path = files[i % len(files)]
            name = path.stem if i < len(files) else f"{path.stem}-mlp{i // len(files)}"
            for tenant in KEYS:
                engine.train(tenant, name, load_examples(path), kind="logreg" if i < len(files) else "mlp")
            names.append(name)
    return names


def start_headfleet(data_dir: Path, port: int, workers: int = 1) -> subprocess.Popen:
    env = dict(os.environ, HEADFLEET_DATA_DIR=str(data_dir), HEADFLEET_PORT=str(port),
               HEADFLEET_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()), HEADFLEET_DEVICE="cpu",
               HEADFLEET_WORKERS=str(workers))
    return subprocess.Popen([sys.executable, "-c", "from headfleet.service.cli import main; main()", "serve",
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL)


def start_peer(port: int, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "bench" / "naive_server.py"), "--port", str(port),
                             "--classifiers", str(n)], stdout=subprocess.DEVNULL)


# -- client --------------------------------------------------------------------------------------
class Phase:
    """Requests from ``connections`` keep-alive connections until ``max_requests`` or ``seconds``."""

    def __init__(self, port: int, key: str | None, bodies, connections: int, max_requests: int, seconds: float):
        self.port, self.bodies, self.connections = port, bodies, connections
        self.max_requests, self.seconds = max_requests, seconds
        self.auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.sent = 0
        self.stop = False

    async def _conn(self, deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            while not self.stop and self.sent < self.max_requests and time.perf_counter() < deadline:
                self.sent += 1
                body = next(self.bodies)
                writer.write(b"POST /classify HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                             + self.auth + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                t0 = time.perf_counter()
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if status == 200:  # only answers count; a 429 or a 5xx is quick and says nothing of speed
                    self.latencies.append(time.perf_counter() - t0)
                self.statuses[status] = self.statuses.get(status, 0) + 1
        finally:
            writer.close()

    async def run(self) -> "Phase":
        t0 = time.perf_counter()
        await asyncio.gather(*(self._conn(t0 + self.seconds) for _ in range(self.connections)))
        self.wall = time.perf_counter() - t0
        return self

    def summary(self) -> dict:
        out = percentiles_ms(self.latencies) if self.latencies else {"n": 0}
        out["req_per_s"] = len(self.latencies) / self.wall if self.wall else 0.0  # 200s only
        out["statuses"] = self.statuses
        out["not_200"] = sum(n for s, n in self.statuses.items() if s != 200)
        return out


def bodies(texts_per_request: int, classifiers: list[str], unique: bool, tag: str):
    pool = sms_texts()
    counter = itertools.count()
    fixed = json.dumps({"texts": pool[:texts_per_request], "classifiers": classifiers}).encode()
    while True:
        if not unique:
            yield fixed
            continue
        n = next(counter)
        texts = [f"{pool[(n * texts_per_request + j) % len(pool)]} [{tag} {n}.{j}]" for j in range(texts_per_request)]
        yield json.dumps({"texts": texts, "classifiers": classifiers}).encode()


def verify(hf_port: int, peer_port: int | None, classifiers: list[str], workers: int = 1) -> list[str]:
    """The checks made before any timed phase (see the module docstring); returns the lines to print."""
    texts = sms_texts(64)
    body = {"texts": texts, "classifiers": classifiers}

    def labels(port: int, key: str | None) -> list[str]:
        r = httpx.post(f"http://127.0.0.1:{port}/classify", json=body, timeout=300,
                       headers={"Authorization": f"Bearer {key}"} if key else {})
        if r.status_code != 200:
            refuse(f"port {port} answered {r.status_code} to the check request: {r.text[:300]}")
        results = r.json()["results"]
        try:
            return [res["classifications"][c]["label"] for res in results for c in classifiers]
        except KeyError as exc:
            refuse(f"port {port} left out a classification: {exc}")

    ours = labels(hf_port, KEYS["a"])
    if ours != labels(hf_port, KEYS["b"]):
        refuse("tenants a and b hold the same classifiers but label the same texts differently")
    lines = [f"headfleet: {len(texts)} texts x {len(classifiers)} classifiers labelled, same for tenants a and b"]
    if peer_port is not None:
        lines.append(check_labels("headfleet vs naive server", ours, labels(peer_port, None), 0.9))
    one = {"texts": [f"a check text nobody sent before {time.time_ns()}"], "classifiers": classifiers}
    auth = {"Authorization": f"Bearer {KEYS['a']}"}
    first = httpx.post(f"http://127.0.0.1:{hf_port}/classify", json=one, headers=auth, timeout=60).json()
    again = httpx.post(f"http://127.0.0.1:{hf_port}/classify", json=one, headers=auth, timeout=60).json()
    # with several workers the repeat may reach another worker, whose memory tier has not seen the text
    # yet: the shared local store answers it there
    tiers = ("memory",) if workers == 1 else ("memory", "local")
    if first["cache"]["computed"] != 1 or again["cache"]["computed"] != 0 or \
            sum(again["cache"]["hits"][t] for t in tiers) != 1:
        refuse(f"headfleet's cache does not behave as phases a and b assume: {first['cache']}, then {again['cache']}")
    lines.append(f"headfleet: a new text is computed once, its repeat is a {' or '.join(tiers)} hit")
    return lines


async def run_phases(port: int, classifiers: list[str], args, tenant_keys: bool, label: str) -> dict:
    key_a = KEYS["a"] if tenant_keys else None
    key_b = KEYS["b"] if tenant_keys else None
    out = {}
    warm = Phase(port, key_a, bodies(1, classifiers, False, ""), 1, 20, 30)
    await warm.run()
    out["cached"] = (await Phase(port, key_a, bodies(1, classifiers, False, ""), args.connections,
                                 args.max_requests, args.seconds).run()).summary()
    out["uncached"] = (await Phase(port, key_a, bodies(1, classifiers, True, f"{label}-u"), args.low_concurrency,
                                   args.max_requests, args.seconds).run()).summary()
    b_alone = await Phase(port, key_b, bodies(1, classifiers, True, f"{label}-b0"), 1, args.max_requests,
                          args.seconds).run()
    flood = Phase(port, key_a, bodies(32, classifiers, True, f"{label}-flood"), args.flood_connections,
                  args.max_requests, args.seconds + 5)
    flood_task = asyncio.create_task(flood.run())
    await asyncio.sleep(1.0)  # let A's queue build up
    b_flood = await Phase(port, key_b, bodies(1, classifiers, True, f"{label}-b1"), 1, args.max_requests,
                          args.seconds).run()
    flood.stop = True
    await flood_task
    out["b_alone"] = b_alone.summary()
    out["b_during_flood"] = b_flood.summary()
    out["flood_a"] = flood.summary()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="time limit per phase")
    ap.add_argument("--max-requests", type=int, default=50_000, help="request limit per phase")
    ap.add_argument("--connections", type=int, default=16, help="connections for the cached phase")
    ap.add_argument("--low-concurrency", type=int, default=1, help="connections for the uncached phase")
    ap.add_argument("--flood-connections", type=int, default=4)
    ap.add_argument("--classifiers", type=int, default=5)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--workers", type=int, default=1,
                    help="headfleet serve --workers N (worker processes on one port; default 1)")
    args = ap.parse_args()
    begin("HTTP load on loopback: headfleet vs a naive encode + predict_proba server")

    with tempfile.TemporaryDirectory() as tmp:
        names = train_classifiers(Path(tmp), args.classifiers)
        results = {}
        hf_port, peer_port = free_port(), None if args.skip_peer else free_port()
        procs = [start_headfleet(Path(tmp), hf_port, args.workers)]
        if peer_port is not None:
            procs.append(start_peer(peer_port, args.classifiers))
        try:
            for port, proc in zip((hf_port, peer_port), procs):
                wait_ready(f"http://127.0.0.1:{port}", proc)
            wait_workers(hf_port, args.workers)
            checked = verify(hf_port, peer_port, names, args.workers)  # both up, neither timed yet
            served = httpx.get(f"http://127.0.0.1:{hf_port}/info").json()["backbone"]
            checked.insert(0, f"headfleet serves {served['backend']} {served['precision']} ({served['source']}), "
                              f"{args.workers} worker process(es)")
            print("\n".join(checked), flush=True)
            # one side timed at a time; the other server sits idle
            results["headfleet"] = asyncio.run(run_phases(hf_port, names, args, True, "hf"))
            if peer_port is not None:
                results["naive"] = asyncio.run(run_phases(peer_port, names, args, False, "peer"))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)

    ours, peer = results["headfleet"], results.get("naive")

    def fmt(s: dict) -> str:
        return (f"{s['req_per_s']:8.1f} req/s  p50 {s.get('p50_ms', float('nan')):7.2f} ms  "
                f"p99 {s.get('p99_ms', float('nan')):7.2f} ms  (n={s['n']} answered; statuses {s['statuses']})")

    rows = []
    for phase, title in (("cached", f"(a) cached, 1 text x {args.classifiers}, {args.connections} conns"),
                         ("uncached", f"(b) uncached, 1 text x {args.classifiers}, {args.low_concurrency} conn"),
                         ("b_alone", "(c) tenant B alone"), ("b_during_flood", "(c) tenant B while A floods"),
                         ("flood_a", f"(c) tenant A flood, 32 texts/request, {args.flood_connections} conns")):
        rows.append((f"{title}: headfleet", fmt(ours[phase])))
        if peer:
            rows.append((f"{title}: naive", fmt(peer[phase])))
    def ratio(a: dict, b: dict, key: str, digits: int = 2) -> str:
        """a[key] / b[key], or why there is none (a phase with no 200 answer has no latency)."""
        if not a.get("n") or not b.get("n") or not b.get(key):
            return "no ratio: a phase got no 200 answer"
        return f"{a[key] / b[key]:.{digits}f}x"

    rows.append(("(c) headfleet B p99 during flood / alone",
                 f"{ratio(ours['b_during_flood'], ours['b_alone'], 'p99_ms')}  (goal <= 2x)"))
    if peer:
        rows.append(("(a) cached req/s, headfleet / naive", ratio(ours["cached"], peer["cached"], "req_per_s", 1)))
        rows.append(("(b) uncached p99, naive / headfleet", ratio(peer["uncached"], ours["uncached"], "p99_ms")))
        rows.append(("(c) naive B p99 during flood / alone", ratio(peer["b_during_flood"], peer["b_alone"], "p99_ms")))
    rows += [("checked before timing", line) for line in checked]
    report("HTTP load on loopback: headfleet vs a naive encode + predict_proba server", rows,
           {"args": vars(args), **results})


if __name__ == "__main__":
    main()
