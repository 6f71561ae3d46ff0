"""Head fan-out: 1,000 heads over a batch of 64 embeddings in one batched operation, against a
loop calling each head's own scikit-learn ``predict_proba``.

The heads are real scikit-learn models (binary and 3-class logistic regression, and some
MLPs) fitted on real MiniLM embeddings of SMS texts with random label assignments. Before any
timed call every head's probabilities from the fleet are compared with its own ``predict_proba``
(max |difference| <= 1e-4, or no figure).

    .venv/bin/python bench/fanout.py [--heads 1000] [--batch 64] [--repeats 50]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from _common import begin, check_close, percentiles_ms, report, sms_texts
from headfleet.embedder import Embedder
from headfleet.heads import HeadArrays, HeadFleet


def fit_heads(X: np.ndarray, n_heads: int, mlp_every: int, seed: int = 0):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    models = []
    warnings.simplefilter("ignore", ConvergenceWarning)
    for i in range(n_heads):
        n_classes = 2 if i % 3 else 3
        direction = rng.normal(size=(X.shape[1], n_classes))
        y = np.argmax(X @ direction + 0.1 * rng.normal(size=(len(X), n_classes)), axis=1)
        if mlp_every and i % mlp_every == 0:
            m = MLPClassifier(hidden_layer_sizes=(32,), max_iter=30, random_state=i).fit(X, y)
        else:
            m = LogisticRegression(max_iter=200).fit(X, y)
        models.append(m)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--mlp-every", type=int, default=10, help="every k-th head is an MLP (0: none)")
    args = ap.parse_args()
    begin("fan-out of heads over one batch of embeddings")

    embedder = Embedder.load(device="cpu")
    X_train = embedder.embed(sms_texts(400)).vectors
    X = embedder.embed(sms_texts(400 + args.batch)[400:]).vectors
    t0 = time.perf_counter()
    models = fit_heads(X_train, args.heads, args.mlp_every)
    fit_s = time.perf_counter() - t0

    fleet = HeadFleet()
    keys = []
    for i, m in enumerate(models):
        keys.append(f"t{i % 100}/head{i}@1")
        fleet.add(keys[-1], HeadArrays.from_sklearn(m))
    out = fleet.predict(X, keys)  # first call builds the stacked arrays
    ours_p = np.concatenate([out.for_head(j).ravel() for j in range(len(models))])
    theirs_p = np.concatenate([m.predict_proba(X).ravel() for m in models])
    checked = check_close(f"HeadFleet vs each head's predict_proba, {len(models)} heads", ours_p, theirs_p, 1e-4)
    print(checked, flush=True)
    worst = float(np.abs(ours_p - theirs_p).max())

    ours, peer = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fleet.predict(X, keys)
        ours.append(time.perf_counter() - t0)
    for _ in range(max(3, args.repeats // 10)):
        t0 = time.perf_counter()
        for m in models:
            m.predict_proba(X)
        peer.append(time.perf_counter() - t0)
    a, b = percentiles_ms(ours), percentiles_ms(peer)
    n_mlp = sum(1 for m in models if not hasattr(m, "coef_"))
    report("fan-out of heads over one batch of embeddings", [
        ("heads", f"{args.heads} ({n_mlp} MLP, rest logistic regression; fitted in {fit_s:.0f} s)"),
        ("batch", f"{args.batch} MiniLM embeddings"),
        ("headfleet HeadFleet.predict", f"p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms"),
        ("loop of sklearn predict_proba", f"p50 {b['p50_ms']:.1f} ms"),
        ("ratio (p50)", f"{b['p50_ms'] / a['p50_ms']:.0f}x  (goal >= 50x, and under 10 ms)"),
        ("checked before timing", checked),
    ], {"ours": a, "peer": b, "ratio": b["p50_ms"] / a["p50_ms"], "max_abs_diff": worst})


if __name__ == "__main__":
    main()
