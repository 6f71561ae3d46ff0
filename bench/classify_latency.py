"""In-process classify of one short text against 10 classifiers, p50/p99, cached and uncached,
against a naive path (sentence-transformers ``encode`` + each classifier's scikit-learn
``predict_proba``) measured in the same run.

Runs on embedded defaults (memory LRU + local FAISS store, no Redis) in a temporary data folder.
Checked before timing: on 64 other short SMS texts, headfleet's label and the naive path's agree on
>= 95 % of (text, classifier) pairs (the same examples and vectors, fitted by different code; the
MLPs differ most), and a cached answer equals the uncached one; otherwise no figure.

    .venv/bin/python bench/classify_latency.py [--calls 300] [--classifiers 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import numpy as np

from _common import REPO, begin, check_close, check_labels, percentiles_ms, refuse, report, sms_texts
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from headfleet.heads import load_examples
from headfleet.engine import Engine
from headfleet.settings import Settings


def _scores(answer: dict, names: list[str]) -> np.ndarray:
    return np.array([s for r in answer["results"] for n in names for s in r["classifications"][n]["scores"].values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--classifiers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    begin(f"classify 1 short text x {args.classifiers} classifiers, in process")

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.open(Settings(data_dir=Path(tmp), threads=args.threads, device="cpu"))
        files = sorted((REPO / "engine" / "example_data").glob("*.csv"))
        names, sk_models = [], []
        for i in range(args.classifiers):
            ex = load_examples(files[i % len(files)])
            kind = "mlp" if i % 5 == 4 else "logreg"
            names.append(f"c{i}")
            engine.train("bench", names[-1], ex, kind=kind, seed=i)
            X = engine.embed("bench", ex.texts).vectors
            peer_model = LogisticRegression(max_iter=2000) if kind == "logreg" else \
                MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=i)
            sk_models.append(peer_model.fit(X, ex.labels))
        texts = sms_texts()
        short = [t for t in texts if 20 <= len(t) <= 80]
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(engine.embedder.folder), device="cpu")

        # checked before timing, on texts the timed calls do not send
        probe = [f"{t} (probe {i})" for i, t in enumerate(short[-64:])]
        first = engine.classify("bench", probe, names)
        again = engine.classify("bench", probe, names)
        ours_labels = [r["classifications"][n]["label"] for r in first["results"] for n in names]
        V = st.encode(probe, convert_to_numpy=True)
        peer_labels = [str(m.classes_[p.argmax()]) for i in range(len(probe)) for m in sk_models
                       for p in m.predict_proba(V[i:i + 1])]
        checked = [check_labels(f"headfleet vs naive path, {len(probe)} texts x {len(names)} classifiers",
                                ours_labels, peer_labels, 0.95),
                   check_close("cached vs uncached scores", _scores(again, names), _scores(first, names), 1e-6)]
        if first["cache"]["computed"] != len(probe) or again["cache"]["computed"] != 0:
            refuse(f"the probe was not computed once then cached: {first['cache']}, then {again['cache']}")
        print("\n".join(checked), flush=True)

        # cached: the same text every call (first call fills the cache)
        engine.classify("bench", [short[0]], names)
        cached = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            engine.classify("bench", [short[0]], names)
            cached.append(time.perf_counter() - t0)
        # uncached: a text never seen before every call
        fresh = [f"{short[i % len(short)]} #{i}" for i in range(args.calls)]
        uncached = []
        for t in fresh:
            t0 = time.perf_counter()
            out = engine.classify("bench", [t], names)
            uncached.append(time.perf_counter() - t0)
            if out["cache"]["computed"] != 1:
                refuse(f"an 'uncached' call was served from the cache: {out['cache']}")
        # the naive peer: encode + a loop of predict_proba, no cache
        peer = []
        for t in fresh:
            t0 = time.perf_counter()
            v = st.encode([t], convert_to_numpy=True)
            for m in sk_models:
                m.predict_proba(v)
            peer.append(time.perf_counter() - t0)
        engine.close()

    c, u, p = percentiles_ms(cached), percentiles_ms(uncached), percentiles_ms(peer)
    report(f"classify 1 short text x {args.classifiers} classifiers, in process", [
        ("torch threads", str(torch.get_num_threads())),
        ("headfleet cached", f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms  (goal p99 <= 2 ms)"),
        ("headfleet uncached", f"p50 {u['p50_ms']:.1f} ms, p99 {u['p99_ms']:.1f} ms  (goal p99 <= 50 ms)"),
        ("naive encode + predict_proba loop", f"p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms"),
        ("ratio naive/cached (p50)", f"{p['p50_ms'] / c['p50_ms']:.0f}x"),
        ("ratio naive/uncached (p50)", f"{p['p50_ms'] / u['p50_ms']:.2f}x"),
    ] + [("checked before timing", line) for line in checked], {"cached": c, "uncached": u, "peer": p})


if __name__ == "__main__":
    main()
