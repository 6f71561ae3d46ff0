"""What every bench shares: the texts it runs on and how figures are printed."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMS_SPAM = REPO.parent / "shared" / "data" / "sms_spam.csv"


def sms_texts(n: int | None = None) -> list[str]:
    """Real SMS texts from ../shared/data, or the package's example texts when it is absent."""
    if SMS_SPAM.exists():
        with open(SMS_SPAM, newline="", encoding="utf-8") as f:
            texts = [row["text"] for row in csv.DictReader(f)]
    else:
        folder = REPO / "engine" / "example_data"
        texts = [row["text"] for p in sorted(folder.glob("*.csv")) for row in csv.DictReader(open(p))]
    if n is not None:
        texts = (texts * (n // len(texts) + 1))[:n]
    return texts


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(a)}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


_LOAD_AT_START = os.getloadavg()  # taken when the bench starts, before its own work raises it


def load_average() -> str:
    """The 1-minute load average when the bench started (a figure whose start was above ~0.5 was
    not taken on a quiet machine, and says so) and now (the bench's own work included)."""
    start, now = _LOAD_AT_START[0], os.getloadavg()[0]
    return f"load average {start:.2f} at start, {now:.2f} now" + ("" if start < 0.5 else " (NOT QUIET at start)")


def report(title: str, rows: list[tuple[str, str]], extra: dict | None = None) -> None:
    print(f"\n## {title}  ({machine()}; {load_average()})")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    if extra is not None:
        print("  json: " + json.dumps(extra, sort_keys=True))


def sms_labelled(n: int | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) from ../shared/data/sms_spam.csv, the first ``n`` rows."""
    with open(SMS_SPAM, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def long_texts(n: int, chars: int = 250) -> list[str]:
    """``n`` texts of about ``chars`` characters, each made of consecutive real SMS texts."""
    pool, out, i = sms_texts(), [], 0
    while len(out) < n:
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < chars:
            parts.append(pool[i % len(pool)])
            i += 1
        out.append(" ".join(parts)[:chars].rsplit(" ", 1)[0])  # cut at the last whole word
    return out
