"""What a head shadow costs on the request path: ``/classify`` p50 with and without one, same run.

``headfleet serve`` (embedded defaults) in its own process; tenants ``plain``, ``one`` and ``all``
hold the same 10 classifiers, each with a version 1 (``latest``) and a version 2 (``candidate``,
an MLP head). ``one`` shadows one classifier with its candidate, ``all`` shadows all ten. The same
cached 64-text x 10-classifier request is sent in turn as each tenant (one keep-alive connection
each, order rotated every round). Goal (issue 14): a head shadow adds <= 5 % to the p50.

The peer is what a traffic mirror costs without a shared embedding: the same request sent a second
time naming the candidate versions (``c0@2``), as a mirroring proxy would send it to a second model
server; its time is added to the plain request's.

Checked before timing (no ratio otherwise): a shadowed answer equals the plain one, and each
shadow entry (``"debug": true``) equals scoring the candidate directly. After timing, the shadow
reports must have counted every timed text.

    .venv/bin/python bench/shadow.py [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, begin, check_close, percentiles_ms, refuse, report, sms_labelled  # noqa: E402
from load import free_port, wait_ready  # noqa: E402

KEYS = {"plain": "bench-key-plain", "one": "bench-key-one", "all": "bench-key-all"}
N_CLASSIFIERS = 10


def scores(answer: dict, ref: str, key: str | None = None) -> list[list[float]]:
    rows = []
    for r in answer["results"]:
        entry = r["classifications"][ref]
        entry = entry[key] if key else entry
        rows.append([entry["scores"][k] for k in sorted(entry["scores"])])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=200, help="timed requests per tenant")
    args = ap.parse_args()
    title = f"/classify p50, 64 cached texts x {N_CLASSIFIERS} classifiers, with and without head shadows"
    begin(title)

    from headfleet.engine import Engine
    from headfleet.heads import load_examples
    from headfleet.settings import Settings

    texts, _ = sms_labelled(64)
    files = sorted((REPO / "engine" / "example_data").glob("*.csv"))
    names = [f"c{i}" for i in range(N_CLASSIFIERS)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        with Engine.open(Settings(data_dir=data, device="cpu")) as engine:
            for i, name in enumerate(names):
                ex = load_examples(files[i % len(files)])
                for tenant in KEYS:
                    engine.train(tenant, name, ex, seed=i)
                    engine.train(tenant, name, ex, seed=i, kind="mlp", candidate=True)
        port = free_port()
        env = dict(os.environ, HEADFLEET_DATA_DIR=str(data), HEADFLEET_PORT=str(port), HEADFLEET_DEVICE="cpu",
                   HEADFLEET_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()))
        proc = subprocess.Popen([sys.executable, "-c", "from headfleet.service.cli import main; main()", "serve",
                                 "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            c = {t: httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {k}"})
                 for t, k in KEYS.items()}
            for tenant, shadowed in (("one", names[:1]), ("all", names)):
                for name in shadowed:
                    r = c[tenant].put(f"/classifiers/{name}/shadow", json={"version": "candidate"})
                    if r.status_code != 200:
                        refuse(f"PUT shadow answered {r.status_code}: {r.text}")
            body = {"texts": texts, "classifiers": names}
            mirror = {"texts": texts, "classifiers": [f"{n}@2" for n in names]}
            for t in KEYS:  # warm: fill the cache, load every head
                for _ in range(3):
                    c[t].post("/classify", json=body)
            c["plain"].post("/classify", json=mirror)
            # the check: the same answer with a shadow, and the shadow's entries are the candidate's
            plain = c["plain"].post("/classify", json=body).json()
            checks = []
            for t in ("one", "all"):
                got = c[t].post("/classify", json=body).json()
                checks.append(check_close(f"tenant {t}: answer vs. no shadow", scores(got, "c0"), scores(plain, "c0"), 0))
                dbg = c[t].post("/classify", json=dict(body, debug=True)).json()
                direct = c[t].post("/classify", json=dict(body, classifiers=["c0@2"])).json()
                # scores are rounded to 6 decimals, and a head in a GEMM of 11 heads may differ from
                # the same head alone in the last float32 bits: one rounding step apart at most
                checks.append(check_close(f"tenant {t}: shadow entries vs. scoring c0@2", scores(dbg, "c0", "shadow"),
                                          scores(direct, "c0@2"), 2e-6))
            before = {t: c[t].get("/classifiers/c0/shadow").json()["n"] for t in ("one", "all")}
            samples: dict[str, list[float]] = {t: [] for t in (*KEYS, "mirror")}
            order = list(KEYS)
            for i in range(args.calls):
                order = order[1:] + order[:1]
                for t in order:
                    t0 = time.perf_counter()
                    r = c[t].post("/classify", json=body)
                    elapsed = time.perf_counter() - t0
                    if r.status_code != 200 or r.json()["cache"]["computed"]:
                        refuse(f"tenant {t}: a timed request answered {r.status_code} or computed embeddings")
                    samples[t].append(elapsed)
                    if t == "plain":
                        t0 = time.perf_counter()
                        r = c[t].post("/classify", json=mirror)
                        if r.status_code != 200:
                            refuse(f"the mirror request answered {r.status_code}")
                        samples["mirror"].append(elapsed + time.perf_counter() - t0)
            counted = {t: c[t].get("/classifiers/c0/shadow").json()["n"] - before[t] for t in ("one", "all")}
        finally:
            proc.terminate()
            proc.wait(30)
    for t, n in counted.items():
        if n != args.calls * len(texts):
            refuse(f"tenant {t}: the shadow counted {n} texts, not the {args.calls * len(texts)} timed")
    p = {t: percentiles_ms(s) for t, s in samples.items()}
    base = p["plain"]["p50_ms"]
    rows = [("check", line) for line in checks]
    rows += [
        ("no shadow", f"p50 {base:.2f} ms, p99 {p['plain']['p99_ms']:.2f} ms ({p['plain']['n']} requests)"),
        ("1 head shadow", f"p50 {p['one']['p50_ms']:.2f} ms: {100 * (p['one']['p50_ms'] / base - 1):+.1f} % "
                          f"(goal <= 5 %), p99 {p['one']['p99_ms']:.2f} ms"),
        ("10 head shadows", f"p50 {p['all']['p50_ms']:.2f} ms: {100 * (p['all']['p50_ms'] / base - 1):+.1f} %, "
                            f"p99 {p['all']['p99_ms']:.2f} ms"),
        ("peer: mirror request", f"p50 {p['mirror']['p50_ms']:.2f} ms: {100 * (p['mirror']['p50_ms'] / base - 1):+.1f} % "
                                 f"(the request again, naming the 10 candidates); 10 shadows cost "
                                 f"{(p['all']['p50_ms'] - base) / max(p['mirror']['p50_ms'] - base, 1e-9):.2f}x of it"),
        ("counted by the shadows", f"{counted}"),
    ]
    report(title, rows, {k: round(v["p50_ms"], 3) for k, v in p.items()})


if __name__ == "__main__":
    main()
