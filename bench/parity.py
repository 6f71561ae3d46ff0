"""Parity of every backend + precision with torch fp32 on real sentences: cosine, and head labels.

All of ../shared/data/sms_spam.csv (5,574 SMS) is embedded by each backend. Cosine to the torch
fp32 vector of the same text: min, 1st percentile, mean. Then heads trained on torch fp32 vectors
(as every head in the registry was, before a switch) label a stratified 40 % holdout from each
backend's vectors, and the labels are compared with torch fp32's:

- ``spam`` logistic regression and ``spam-mlp`` (MLP, 64 hidden) on the data set's own ham/spam label;
- ``content``: multi-label, labels derived from each SMS's text by regular expressions (``number``:
  5+ digits, ``url``, ``currency``: a currency sign, ``question``: a '?', ``shouting``: 2+ all-caps
  words), so the head must recover surface features from the embedding;
- ``length``: 3 classes by character count (<= 30, 31-90, > 90): a deliberately hard, borderline-heavy
  head (length is weakly encoded), a stress test for label flips;
- the three example classifiers (``engine/example_data``: spam, urgency, sentiment; 30 examples
  each) applied out of domain to the SMS holdout, where many texts sit near their boundaries.

A multi-label head agrees on a text when the whole label set is equal. "texts unchanged" is the
share of holdout texts on which every head gives the torch fp32 label. The spam head's accuracy
against the true labels is shown per backend.

    .venv/bin/python bench/parity.py [--n N] [--threads T] [--cache-dir DIR] [--no-dynamic] [--token-int8]

``--no-dynamic`` leaves out the int8 recipe we did not ship (``quantize_dynamic``), shown for contrast.
``--token-int8`` adds the two per-token SmoothQuant recipes of ``bench/int8_recipes.py`` (not shipped
either): the per-head bound is what decides whether a faster int8 could become a default.
"""

from __future__ import annotations

import argparse
import csv
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import REPO, SMS_SPAM, begin, long_texts, report, sms_texts
from headfleet.embedder import Embedder, fingerprint
from headfleet.embedder.onnx_backend import OrtRunner, model_file, quantize_int8_dynamic
from headfleet.heads import Examples, load_examples, train_head

PATTERNS = {
    "number": re.compile(r"\d{5,}"),
    "url": re.compile(r"https?://|www\.|\.(com|co\.uk|net|org)\b", re.I),
    "currency": re.compile(r"[£$€]"),
    "question": re.compile(r"\?"),
    "shouting": re.compile(r"(\b[A-Z]{3,}\b.*){2,}"),
}


def derived_content(text: str) -> list[str]:
    return sorted(k for k, p in PATTERNS.items() if p.search(text))


def length_band(text: str) -> str:
    return "short" if len(text) <= 30 else "medium" if len(text) <= 90 else "long"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="first N rows of sms_spam (default: all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="ONNX exports (default: a temp dir)")
    ap.add_argument("--no-dynamic", action="store_true", help="leave out the quantize_dynamic int8 contrast")
    ap.add_argument("--token-int8", nargs="?", const="all", default=None,
                    help="add the per-token SmoothQuant int8 recipes of bench/int8_recipes.py (not shipped): all, "
                         "or a comma-separated list of their names")
    args = ap.parse_args()
    begin("parity of every backend with torch fp32")
    threads = args.threads or torch.get_num_threads()
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="headfleet-onnx-"))

    with open(SMS_SPAM, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: args.n]
    texts, spam = [r["text"] for r in rows], [r["label"] for r in rows]
    from sklearn.model_selection import train_test_split

    train, hold = train_test_split(np.arange(len(texts)), test_size=0.4, random_state=0, stratify=spam)
    train, hold = np.sort(train), np.sort(hold)

    backends = {
        "torch fp32": Embedder.load(device="cpu", threads=threads),
        "onnx fp32": Embedder.load(device="cpu", threads=threads, backend="onnx", cache_dir=cache_dir),
        "onnx int8": Embedder.load(device="cpu", threads=threads, backend="onnx", precision="int8", cache_dir=cache_dir),
        "onnx w8a8": Embedder.load(device="cpu", threads=threads, backend="onnx", precision="w8a8", cache_dir=cache_dir),
    }
    if not args.no_dynamic:
        e = backends["onnx fp32"]
        src = model_file(cache_dir, fingerprint(e.folder, e.pooling), "fp32")
        dyn = model_file(cache_dir, fingerprint(e.folder, e.pooling), "int8-dynamic")
        if not dyn.exists():
            quantize_int8_dynamic(src, dyn)
        other = Embedder.load(device="cpu", threads=threads, backend="onnx", precision="int8", cache_dir=cache_dir)
        other.runner = OrtRunner(dyn, threads=threads)  # same tokeniser and batching, the other int8 graph
        backends["onnx int8 quantize_dynamic (not shipped)"] = other
    if args.token_int8:
        import _token_int8
        from int8_recipes import build_token_recipes

        e = backends["onnx fp32"]
        src = model_file(cache_dir, fingerprint(e.folder, e.pooling), "fp32")
        batches = _token_int8.calibration_batches(e, sms_texts(2000), long_texts(700))
        for name, path in build_token_recipes(
                src, cache_dir, batches, None if args.token_int8 == "all" else args.token_int8.split(",")).items():
            other = Embedder.load(device="cpu", threads=threads, backend="onnx", cache_dir=cache_dir)
            other.runner = OrtRunner(path, threads=threads)
            backends[f"onnx {name} (not shipped)"] = other
    vectors, seconds = {}, {}
    for name, e in backends.items():
        e.batch_size = 64
        t0 = time.perf_counter()
        vectors[name] = e.embed(texts).vectors
        seconds[name] = time.perf_counter() - t0
    ref = vectors["torch fp32"]

    # heads, all trained on torch fp32 vectors of the train split
    def fit(labels, kind="logreg", multi=False, X=None, ex_texts=None):
        ex = Examples(list(ex_texts) if ex_texts is not None else [texts[i] for i in train], labels, multi_label=multi)
        return train_head(X if X is not None else ref[train], ex, kind=kind, seed=0, holdout=0).head

    heads = {
        "spam": fit([spam[i] for i in train]),
        "spam-mlp": fit([spam[i] for i in train], kind="mlp"),
        "content (multi-label)": fit([derived_content(texts[i]) for i in train], multi=True),
        "length (3 bands)": fit([length_band(texts[i]) for i in train]),
    }
    tch = backends["torch fp32"]
    for name in ("spam", "urgency", "sentiment"):
        ex = load_examples(REPO / "engine" / "example_data" / f"{name}.csv")
        heads[f"example {name}"] = train_head(tch.embed(ex.texts).vectors, ex, seed=0, holdout=0).head

    def labels_of(head, X):
        p = head.predict_proba(X)
        return (p >= 0.5) if head.multi_label else p.argmax(1)

    ref_labels = {h: labels_of(head, ref[hold]) for h, head in heads.items()}
    y_true = np.array([heads["spam"].labels.index(spam[i]) for i in hold])
    rows, extra = [], {}
    for name, v in vectors.items():
        cos = cosine(v, ref)
        agree = {}
        unchanged = np.ones(len(hold), dtype=bool)
        for h, head in heads.items():
            got = labels_of(head, v[hold])
            same = (got == ref_labels[h]).all(1) if head.multi_label else got == ref_labels[h]
            agree[h] = float(same.mean())
            unchanged &= same
        spam_acc = float((labels_of(heads["spam"], v[hold]) == y_true).mean())
        rows.append((name, f"cosine min {cos.min():.7f}  p1 {np.percentile(cos, 1):.7f}  mean {cos.mean():.7f}   "
                           f"texts with every head unchanged {unchanged.mean():.2%}   spam accuracy {spam_acc:.2%}   "
                           f"({seconds[name]:.1f} s to embed)"))
        rows.append(("", "agreement: " + ", ".join(f"{h} {a:.2%}" for h, a in agree.items())))
        extra[name] = {"cos_min": float(cos.min()), "cos_p1": float(np.percentile(cos, 1)), "cos_mean": float(cos.mean()),
                       "unchanged": float(unchanged.mean()), "agreement": agree, "spam_accuracy": spam_acc}
    counts = {k: int(sum(k in derived_content(texts[i]) for i in hold)) for k in PATTERNS}
    header = [("data", f"{len(texts)} SMS embedded by each backend; heads trained on torch fp32 vectors of "
                       f"{len(train)}, labels compared on a stratified holdout of {len(hold)}; {threads} thread(s)"),
              ("content labels in holdout", ", ".join(f"{k} {v}" for k, v in counts.items()))]
    report("parity with torch fp32 (goal: >= 98% of texts keep every head's label)", header + rows, extra)


if __name__ == "__main__":
    main()
