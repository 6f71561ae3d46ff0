"""The peer for bench/load.py: what a team writes without headfleet.

One Litestar endpoint, ``POST /classify`` with the same body, that runs sentence-transformers
``encode`` on the texts and then each requested classifier's scikit-learn ``predict_proba`` —
no cache, no shared batching, no tenants. Same framework and server as headfleet, so the
difference measured is the serving design, not the HTTP stack.

    python bench/naive_server.py --port 8091 [--classifiers 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec
import uvicorn
from litestar import Litestar, get, post
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402


class Body(msgspec.Struct):
    texts: list[str]
    classifiers: list[str]


def build(n_classifiers: int):
    from sentence_transformers import SentenceTransformer

    from headfleet.embedder.backbone import default_model_path
    from headfleet.heads import load_examples

    model = SentenceTransformer(str(default_model_path()), device="cpu")
    files = sorted((REPO / "engine" / "example_data").glob("*.csv"))
    heads = {}
    for i in range(n_classifiers):
        path = files[i % len(files)]
        ex = load_examples(path)
        X = model.encode(ex.texts, batch_size=64)
        est = MLPClassifier((64,), max_iter=300, random_state=0) if i >= len(files) else LogisticRegression(max_iter=1000)
        heads[classifier_name(path.stem, i, len(files))] = est.fit(X, ex.labels)
    return model, heads


def classifier_name(stem: str, i: int, n_files: int) -> str:
    return stem if i < n_files else f"{stem}-mlp{i // n_files}"


def create(n_classifiers: int) -> Litestar:
    model, heads = build(n_classifiers)

    @post("/classify", status_code=200, sync_to_thread=True)
    def classify(data: Body) -> dict:
        X = model.encode(data.texts, batch_size=64)
        results = []
        for i in range(len(data.texts)):
            per = {}
            for name in data.classifiers:
                est = heads[name]
                p = est.predict_proba(X[i:i + 1])[0]
                per[name] = {"label": str(est.classes_[p.argmax()]),
                             "scores": {str(c): float(x) for c, x in zip(est.classes_, p)}}
            results.append({"index": i, "classifications": per})
        return {"results": results}

    @get("/health", sync_to_thread=False)
    def health() -> dict:
        return {"status": "ready", "classifiers": sorted(heads)}

    return Litestar([classify, health])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--classifiers", type=int, default=5)
    args = ap.parse_args()
    uvicorn.run(create(args.classifiers), host="127.0.0.1", port=args.port, log_level="warning",
                http="httptools", loop="uvloop")
