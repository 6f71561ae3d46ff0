"""Embedding throughput: headfleet's embedder against sentence-transformers ``encode``.

Same model folder, same texts, same batch size, same torch thread count, same process. Both
embed every text once first and their vectors are compared (cosine >= 0.9999 on each text, or no
ratio); then the two alternate over several rounds and the best round of each is compared.

    .venv/bin/python bench/embed_throughput.py [--n 2000] [--batch-size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from _common import begin, check_vectors, report, sms_texts, timed
from headfleet.embedder import Embedder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    begin("embedding throughput, all-MiniLM-L6-v2, CPU")

    from sentence_transformers import SentenceTransformer

    texts = sms_texts(args.n)
    ours = Embedder.load(batch_size=args.batch_size, device="cpu")
    peer = SentenceTransformer(str(ours.folder), device="cpu")
    checked = check_vectors("headfleet vs sentence-transformers, every text", ours.embed(texts).vectors,
                            peer.encode(texts, batch_size=args.batch_size, convert_to_numpy=True))  # and warm-up
    print(checked, flush=True)
    best_ours = best_peer = float("inf")
    for _ in range(args.rounds):
        t, _ = timed(ours.embed, texts)
        best_ours = min(best_ours, t)
        t, _ = timed(peer.encode, texts, batch_size=args.batch_size, convert_to_numpy=True)
        best_peer = min(best_peer, t)
    a, b = len(texts) / best_ours, len(texts) / best_peer
    report("embedding throughput, all-MiniLM-L6-v2, CPU", [
        ("texts", f"{len(texts)} SMS, batch {args.batch_size}, {torch.get_num_threads()} torch threads"),
        ("headfleet Embedder.embed", f"{a:,.0f} texts/s"),
        ("sentence-transformers encode", f"{b:,.0f} texts/s"),
        ("ratio", f"{a / b:.2f}x  (goal >= 1.0x)"),
        ("checked before timing", checked),
    ], {"ours_texts_per_s": a, "peer_texts_per_s": b, "ratio": a / b})


if __name__ == "__main__":
    main()
