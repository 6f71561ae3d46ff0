"""How long a tenant's dashboard page with many classifiers takes to reach the browser's ``load`` event.

``headfleet serve`` in its own process, one tenant with ``--classifiers`` classifiers (default 1,000:
one trained from the example spam data, the others its head saved again under other names through
the registry, so every one is a real registry entry), after real ``/classify`` traffic naming a few
of them. Headless Chromium (Debian's package, through Playwright) signs in with the tenant's key
and opens ``/dashboard/t/bench`` — the cache figures with their three charts, the first page of 50
classifiers out of all of them, the experiments — and the time from navigation start to the
``load`` event (``PerformanceNavigationTiming.loadEventStart``) is taken, in two states alternated:

- *steady*: nothing changed since the last load, so the charts come from the SVG cache;
- *after traffic*: one ``/classify`` right before, so /stats changed and every chart is redrawn.

The peer is the raw JSON the page stands in for, opened in the same browser as a document:
``GET /classifiers`` (the tenant's full listing, every manifest read) and ``GET /stats`` with the
key as a header; their load times are added and the dashboard's figure is given as a ratio to them.
Goal (issue 17): under 1 s.

Checked before timing (no figure otherwise): the page says it holds all the classifiers, lists 50,
and shows the same lookups and hit rate as ``GET /stats`` read right after it.

    .venv/bin/python bench/dashboard.py [--classifiers 1000] [--rounds 10] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, begin, refuse, report, sms_texts  # noqa: E402
from load import free_port, wait_ready  # noqa: E402

KEY = "bench-dashboard-key"
TENANT = "bench"
LOAD_MS = "() => performance.getEntriesByType('navigation')[0].loadEventStart"


def populate(data: Path, n: int) -> None:
    """One trained classifier and ``n - 1`` copies of its head, saved through the registry."""
    from headfleet.engine import Engine
    from headfleet.heads import load_examples
    from headfleet.settings import Settings

    with Engine.open(Settings(data_dir=data, device="cpu")) as engine:
        engine.train(TENANT, "c0000", load_examples(REPO / "engine" / "example_data" / "spam.csv"))
        manifest, head = engine.registry.load(TENANT, "c0000@1")
        keep = {k: manifest[k] for k in ("parent_fingerprint", "tokenizer_hash", "metrics") if k in manifest}
        for i in range(1, n):
            engine.registry.save(TENANT, f"c{i:04d}", head, dict(keep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classifiers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10, help="timed loads per state and contender")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    title = f"dashboard page with {args.classifiers:,} classifiers: time to the browser's load event"
    begin(title)
    from playwright.sync_api import sync_playwright

    texts = sms_texts(200)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        populate(data, args.classifiers)
        port = free_port()
        env = dict(os.environ, HEADFLEET_DATA_DIR=str(data), HEADFLEET_PORT=str(port), HEADFLEET_DEVICE="cpu",
                   HEADFLEET_API_KEYS=f"{TENANT}:{KEY}")
        proc = subprocess.Popen([sys.executable, "-c", "from headfleet.service.cli import main; main()", "serve",
                                 "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            api = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
            names = ["c0000", "c0001", "c0002"]
            for i in range(0, len(texts), 50):  # traffic: misses, then the same texts again as hits
                for _ in range(2):
                    r = api.post("/classify", json={"texts": texts[i:i + 50], "classifiers": names})
                    if r.status_code != 200:
                        refuse(f"/classify answered {r.status_code}: {r.text}")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium)
                ctx = browser.new_context()
                page = ctx.new_page()
                page.goto(f"{url}/dashboard/login")
                page.fill("#key", KEY)
                page.click("button[type=submit]")
                page.wait_for_load_state("load")
                if not page.url.endswith(f"/dashboard/t/{TENANT}"):
                    refuse(f"sign-in did not reach the tenant page: {page.url}")
                # the check: the page holds every classifier and /stats' figures
                count = page.text_content("#listing-count")
                rows = page.locator("#classifiers tbody tr").count()
                stats = api.get("/stats").json()["since_start"]
                shown = {json.loads(f)[-1]: json.loads(v) for f, v in page.eval_on_selector_all(
                    "[data-figure]", "els => els.map(e => [e.dataset.figure, e.dataset.value])")
                    if json.loads(f)[:2] == ["stats", "since_start"] and len(json.loads(f)) == 3}
                if f"of {args.classifiers:,}" not in count or rows != min(50, args.classifiers):
                    refuse(f"the page lists {rows} rows and says {count!r}")
                if shown.get("lookups") != stats["lookups"] or shown.get("hit_rate") != stats["hit_rate"]:
                    refuse(f"page figures {shown} differ from /stats {stats}")
                checks = [f"page lists {rows} of {args.classifiers:,} classifiers; lookups {stats['lookups']:,} and "
                          f"hit rate {stats['hit_rate']:.3f} equal /stats"]
                peer = browser.new_context(extra_http_headers={"Authorization": f"Bearer {KEY}"}).new_page()
                listing = peer.goto(f"{url}/classifiers")
                if listing.status != 200 or len(listing.json()["classifiers"]) != args.classifiers:
                    refuse("GET /classifiers did not list every classifier")

                def timed(pg, path: str) -> float:
                    pg.goto(url + path)
                    pg.wait_for_load_state("load")
                    return float(pg.evaluate(LOAD_MS))

                timed(page, f"/dashboard/t/{TENANT}")  # warm: matplotlib imported, first charts drawn
                steady, fresh, raw = [], [], []
                for i in range(args.rounds):
                    steady.append(timed(page, f"/dashboard/t/{TENANT}"))
                    api.post("/classify", json={"texts": [texts[i]], "classifiers": names[:1]})
                    fresh.append(timed(page, f"/dashboard/t/{TENANT}"))
                    raw.append(timed(peer, "/classifiers") + timed(peer, "/stats"))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(60)

    def line(xs: list[float]) -> str:
        return f"median {statistics.median(xs):7.1f} ms, max {max(xs):7.1f} ms over {len(xs)} loads"

    med = {k: statistics.median(v) for k, v in (("steady", steady), ("fresh", fresh), ("raw", raw))}
    rows = [("checked", checks[0]),
            ("dashboard, steady (charts cached)", line(steady)),
            ("dashboard, after traffic (charts redrawn)", line(fresh)),
            ("peer: GET /classifiers + GET /stats as JSON", line(raw)),
            ("ratio to the peer (median)", f"steady {med['steady'] / med['raw']:.2f}x, "
                                           f"after traffic {med['fresh'] / med['raw']:.2f}x"),
            ("goal: load event < 1000 ms", "met" if max(med["steady"], med["fresh"]) < 1000 else "NOT met")]
    report(title, rows, {"classifiers": args.classifiers, "median_ms": med})


if __name__ == "__main__":
    main()
