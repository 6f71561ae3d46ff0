"""What every bench shares: the texts it runs on, the checks it makes before it times, how figures
are printed.

Every bench follows one order:

    begin(title)                      # machine and load average, printed before any work
    ... build the contenders ...
    check_vectors / check_labels / check_close(...)   # each contender's output against ours;
                                      # a miss calls refuse(): no timed round, no ratio, exit 2
    ... timed rounds (only successful answers count) ...
    report(title, rows)               # figures, with the load average at start and now
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMS_SPAM = REPO.parent / "shared" / "data" / "sms_spam.csv"


def sms_texts(n: int | None = None) -> list[str]:
    """Real SMS texts from ../shared/data (the figures are about them: no silent stand-in when it is absent)."""
    if not SMS_SPAM.exists():
        raise SystemExit(f"{SMS_SPAM} is missing: the benches run on real SMS texts from ../shared/data")
    with open(SMS_SPAM, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
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
    """Architecture, CPU model, cores, whether the CPU has an int8 dot product (VNNI or AMX: it
    decides whether int8 pays here, see bench/int8_recipes.py), Python."""
    import os

    from headfleet.settings import cpu_has_int8_dot

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    dot = "int8 dot product (VNNI/AMX)" if cpu_has_int8_dot() else "no int8 dot product (no VNNI/AMX)"
    return (f"{platform.machine()}{' ' + model if model else ''}, {os.cpu_count()} cores, {dot}, "
            f"Python {platform.python_version()}")


_LOAD_AT_START = os.getloadavg()  # taken when the bench starts, before its own work raises it


def load_average() -> str:
    """The 1-minute load average when the bench started (a figure whose start was above ~0.5 was
    not taken on a quiet machine, and says so) and now (the bench's own work included)."""
    start, now = _LOAD_AT_START[0], os.getloadavg()[0]
    return f"load average {start:.2f} at start, {now:.2f} now" + ("" if start < 0.5 else " (NOT QUIET at start)")


def begin(title: str) -> None:
    """Print what runs and the load average before the bench does any work (``report`` prints it again at the end)."""
    print(f"# {title}  ({machine()}; {load_average()})", flush=True)


def refuse(why: str) -> NoReturn:
    """Stop before timing: the contenders do not compute the same thing, so no ratio would mean anything."""
    print(f"\nREFUSED: {why}\nNo figure and no ratio is reported for outputs that were not checked equal. "
          f"({load_average()})", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_vectors(what: str, ours: np.ndarray, theirs: np.ndarray, min_cosine: float = 0.9999) -> str:
    """Row-wise cosine of two embedding matrices; refuse below ``min_cosine``. Returns the line to print."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        refuse(f"{what}: shapes differ, {ours.shape} vs {theirs.shape}")
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    worst = float(cos.min()) if len(cos) else 1.0
    if not np.isfinite(cos).all() or worst < min_cosine:
        refuse(f"{what}: cosine min {worst:.7f} on row {int(np.nanargmin(cos))}, below the bound {min_cosine}")
    return f"{what}: cosine min {worst:.7f} over {len(cos)} rows (bound {min_cosine})"


def check_close(what: str, ours: np.ndarray, theirs: np.ndarray, atol: float) -> str:
    """Largest absolute difference of two arrays; refuse above ``atol``. Returns the line to print."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        refuse(f"{what}: shapes differ, {ours.shape} vs {theirs.shape}")
    worst = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    if not np.isfinite(worst) or worst > atol:
        refuse(f"{what}: max |difference| {worst:.2e} above the bound {atol:.0e}")
    return f"{what}: max |difference| {worst:.1e} (bound {atol:.0e})"


def check_labels(what: str, ours: Sequence, theirs: Sequence, min_agreement: float = 1.0) -> str:
    """Share of equal labels; refuse below ``min_agreement``. Returns the line to print."""
    if len(ours) != len(theirs) or not len(ours):
        refuse(f"{what}: {len(ours)} labels vs {len(theirs)}")
    agree = float(np.mean([a == b for a, b in zip(ours, theirs)]))
    if agree < min_agreement:
        refuse(f"{what}: labels agree on {agree:.2%} of {len(ours)}, below the bound {min_agreement:.2%}")
    return f"{what}: labels agree on {agree:.2%} of {len(ours)} (bound {min_agreement:.2%})"


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


def interleaved_processes(script: str, names: Sequence[str], rounds: int, args: list[str],
                          rates: Sequence[str] = ("short", "long")) -> tuple[dict, dict]:
    """Run ``script --only NAME --rounds 1 *args`` for every name, ``rounds`` times over, the names
    interleaved (round 1: a, b, c; round 2: a, b, c; ...), each run a process of its own that prints
    ``RESULT {json of figures}``. Returns ``({name: {figure: value}}, {name: why not})``, where each
    figure named in ``rates`` is the best (highest) over the rounds and any other the last round's:
    a drift of the machine's speed over minutes then hits every contender alike, and no contender
    shares a process (and spinning idle threads) with another runtime."""
    import subprocess

    best: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for _ in range(rounds):
        for name in names:
            if name in skipped:
                continue
            out = subprocess.run([sys.executable, script, "--only", name, "--rounds", "1", *args],
                                 capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                tail = out.stderr.strip().splitlines()
                skipped[name] = f"failed: {tail[-1] if tail else out.returncode}"
                continue
            got = json.loads(lines[-1][7:])
            if "skip" in got:
                skipped[name] = got["skip"]
                continue
            mine = best.setdefault(name, {})
            for k, v in got.items():
                mine[k] = max(mine.get(k, v), v) if k in rates else v
    return best, skipped
