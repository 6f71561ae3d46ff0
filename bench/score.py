"""Batch scoring of a 20,000-document store: ``headfleet score`` against a straightforward script
(sentence-transformers ``encode`` over the store + each classifier's scikit-learn ``predict_proba``,
output written as Parquet), measured in the same run on the same store:

  cold      the store is new to the cache: both embed every document (goal >= 1.0x); measured file by
            file, ours then the script on each, so load changes on a shared machine hit both alike
  re-score  the next day, one new classifier: headfleet reads the vectors from its local store
            (a new engine, empty memory tier), the script embeds everything again (goal >= 20x)

The store is SMS texts from ../shared/data made distinct with a reference suffix, in 4 Parquet
files. Model loading is outside both timings (each side's backbone is loaded before its clock
starts); reading the store and writing the output are inside both.

Checked before timing: both sides score a separate store of 256 other SMS texts with all three
classifiers and must give the same label on >= 98 % of the texts for each (the heads are fitted on
the same examples and vectors by different code, so a borderline text may flip); after timing the
same bound holds on every document of the timed runs, or no ratio is printed.

The backbone is the one a new data folder gets by default (``Settings.with_default_backbone``:
ONNX Runtime on a CPU), unless ``--backend``/``--precision`` name another.

    .venv/bin/python bench/score.py [--docs 20000] [--threads N] [--backend torch|onnx --precision fp32|int8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from _common import REPO, begin, check_labels, report, sms_labelled, sms_texts
from headfleet.embedder import Embedder
from headfleet.heads import examples_from_records, load_examples
from headfleet.scoring import JobSpec, ScoreJob, SourceSpec
from headfleet.engine import Engine
from headfleet.settings import Settings, fast_default

TENANT = "bench"
MIN_AGREEMENT = 0.98  # per classifier, headfleet's labels vs the script's


def build_check_store(folder: Path, n: int = 256) -> None:
    """Texts the timed store does not hold (another suffix), so checking leaves its cache cold."""
    texts = [f"{t} [check {i}]" for i, t in enumerate(sms_texts()[-n:])]
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": np.arange(n, dtype=np.int64), "text": texts}), folder / "check.parquet")


def agreement(ours_files: list[Path], peer_files: list[Path], names: tuple[str, ...]) -> list[str]:
    """Per classifier: headfleet's labels vs the script's, matched by document id; refuses below the bound."""
    ours = pa.concat_tables([pq.read_table(p) for p in ours_files])
    peer = pa.concat_tables([pq.read_table(p) for p in peer_files])
    mine = {name: dict(zip(ours.column("id").to_pylist(), ours.column(name).combine_chunks().field("label").to_pylist()))
            for name in names}
    lines = []
    for name in names:
        theirs = dict(zip(peer.column("id").to_pylist(), peer.column(f"{name}_label").to_pylist()))
        ids = sorted(theirs)
        lines.append(check_labels(f"{name}, {len(ids):,} documents", [mine[name].get(i) for i in ids],
                                  [theirs[i] for i in ids], MIN_AGREEMENT))
    return lines


def build_store(folder: Path, n: int, files: int = 4) -> None:
    base = sms_texts()
    texts = [t if i < len(base) else f"{t} (ref {i // len(base)}-{i})" for i, t in
             enumerate(base[i % len(base)] for i in range(n))]
    texts = [f"{t} [doc {i}]" for i, t in enumerate(texts)]  # distinct from the training texts too
    ids = np.arange(n, dtype=np.int64)
    per = -(-n // files)
    folder.mkdir(parents=True)
    for k in range(files):
        sl = slice(k * per, min(n, (k + 1) * per))
        pq.write_table(pa.table({"id": ids[sl], "text": texts[sl]}), folder / f"part-{k}.parquet")


def naive(st, store: Path, models: dict, out: Path) -> float:
    """The straightforward script: read, encode, predict_proba per classifier, write."""
    t0 = time.perf_counter()
    table = pq.read_table(store)
    texts = table.column("text").to_pylist()
    X = st.encode(texts, batch_size=64, convert_to_numpy=True)
    cols = {"id": table.column("id")}
    for name, model in models.items():
        p = model.predict_proba(X)
        best = p.argmax(axis=1)
        cols[f"{name}_label"] = pa.array(model.classes_[best].tolist())
        cols[f"{name}_score"] = pa.array(p[np.arange(len(best)), best])
    pq.write_table(pa.table(cols), out)
    return time.perf_counter() - t0


def ours(embedder, data: Path, store: Path, classifiers: tuple[str, ...], out: Path) -> tuple[float, dict]:
    """``headfleet score`` in process: open the engine (caches from disk), run the job, close (saves the store)."""
    t0 = time.perf_counter()
    engine = Engine.open(Settings(data_dir=data, device="cpu"), embedder)
    job = ScoreJob(JobSpec(SourceSpec(str(store)), out, TENANT, classifiers), resolve=engine.registry.resolve,
                   batch_size=engine.embedder.batch_size)
    rep = job.run(engine.classify, forwards=lambda: engine.embedder.forwards)
    engine.close()
    return time.perf_counter() - t0, rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", choices=["torch", "onnx"], default=None, help="default: a new data folder's")
    ap.add_argument("--precision", choices=["fp32", "int8"], default=None)
    args = ap.parse_args()
    backend, precision = fast_default("cpu")
    backend, precision = args.backend or backend, args.precision or (precision if not args.backend else "fp32")
    begin(f"batch scoring, {args.docs:,} documents: headfleet score vs encode + predict_proba")
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        build_store(store, args.docs)
        embedder = Embedder.load(device="cpu", threads=args.threads, backend=backend, precision=precision,
                                 cache_dir=tmp / "onnx")
        st = SentenceTransformer(str(embedder.folder), device="cpu")
        data = tmp / "data"
        examples = {"spam": examples_from_records([{"text": t, "label": lab} for t, lab in zip(*sms_labelled(1500))]),
                    "sentiment": load_examples(REPO / "engine" / "example_data" / "sentiment.csv"),
                    "urgency": load_examples(REPO / "engine" / "example_data" / "urgency.csv")}
        peer_models = {}
        with Engine.open(Settings(data_dir=data, device="cpu"), embedder) as engine:
            for name, ex in examples.items():
                engine.train(TENANT, name, ex)
                X = engine.embed(TENANT, ex.texts).vectors
                peer_models[name] = LogisticRegression(max_iter=2000).fit(X, ex.labels)
        st.encode(["warm-up"]), embedder.embed(["warm-up"])

        # checked before timing, on a store of other texts
        build_check_store(tmp / "check")
        every = tuple(examples)
        ours(embedder, data, tmp / "check", every, tmp / "ours-check.parquet")
        naive(st, tmp / "check", peer_models, tmp / "peer-check.parquet")
        checked = agreement([tmp / "ours-check.parquet"], [tmp / "peer-check.parquet"], every)
        print("\n".join(checked), flush=True)

        first = ("spam", "sentiment")
        # cold: file by file, ours then the script on the same file, so a load change on this shared
        # machine hits both sides alike; each of ours is a new engine (empty memory tier)
        t_ours_cold = t_peer_cold = 0.0
        cold = {"embeddings_computed": 0, "backbone_forwards": {"run": 0}}
        for part in sorted(store.glob("*.parquet")):
            t, rep = ours(embedder, data, part, first, tmp / f"ours-cold-{part.stem}.parquet")
            t_ours_cold += t
            cold["embeddings_computed"] += rep["embeddings_computed"]
            cold["backbone_forwards"]["run"] += rep["backbone_forwards"]["run"]
            t_peer_cold += naive(st, part, {n: peer_models[n] for n in first}, tmp / f"peer-cold-{part.stem}.parquet")
        # the next day: one new classifier over the whole store (a new engine: vectors from the local store)
        t_ours_new, new = ours(embedder, data, store, ("urgency",), tmp / "ours-new.parquet")
        t_peer_new = naive(st, store, {"urgency": peer_models["urgency"]}, tmp / "peer-new.parquet")

        # the timed runs computed the same labels, or there is no ratio
        parts = sorted(p.stem for p in store.glob("*.parquet"))
        after = agreement([tmp / f"ours-cold-{p}.parquet" for p in parts], [tmp / f"peer-cold-{p}.parquet" for p in parts],
                          first)
        after += agreement([tmp / "ours-new.parquet"], [tmp / "peer-new.parquet"], ("urgency",))

    n = args.docs
    report(f"batch scoring, {n:,} documents (4 Parquet files), in process", [
        ("headfleet backbone", f"{backend} {precision} (a new data folder's default unless --backend), "
                               f"torch threads {torch.get_num_threads()}"),
        ("cold, 2 classifiers: headfleet score",
         f"{t_ours_cold:.1f} s ({n / t_ours_cold:,.0f} docs/s), {cold['embeddings_computed']:,} embeddings computed, "
         f"{cold['backbone_forwards']['run']} forwards"),
        ("cold: encode + predict_proba script", f"{t_peer_cold:.1f} s ({n / t_peer_cold:,.0f} docs/s)"),
        ("cold ratio", f"{t_peer_cold / t_ours_cold:.2f}x  (goal >= 1.0x)"),
        ("re-score, 1 new classifier: headfleet",
         f"{t_ours_new:.2f} s ({n / t_ours_new:,.0f} docs/s), {new['embeddings_computed']} embeddings computed, "
         f"{new['backbone_forwards']['run']} forwards run, {new['backbone_forwards']['saved']} saved, "
         f"hits local {new['cache']['hits']['local']:,}"),
        ("re-score: encode + predict_proba script", f"{t_peer_new:.1f} s ({n / t_peer_new:,.0f} docs/s)"),
        ("re-score ratio", f"{t_peer_new / t_ours_new:.1f}x  (goal >= 20x)"),
    ] + [("checked before timing", line) for line in checked] + [("checked after timing", line) for line in after],
        {"docs": n, "ours_cold_s": t_ours_cold, "peer_cold_s": t_peer_cold, "ours_rescore_s": t_ours_new,
         "peer_rescore_s": t_peer_new, "cold_ratio": t_peer_cold / t_ours_cold,
         "rescore_ratio": t_peer_new / t_ours_new})


if __name__ == "__main__":
    main()
