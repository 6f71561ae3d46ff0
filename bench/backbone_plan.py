"""How long the backbone-upgrade gate takes for a fleet, and what the shared cache saves.

N head classifiers (default 1,000) of one tenant, each trained on 200 examples drawn from
../shared/data/sms_spam.csv under one of several labelings (the data set's spam/ham, "has a
number", "asks a question", "is long", "shouts"), so texts repeat across classifiers as they do in
a fleet that shares traffic. Then ``plan`` (lifecycle.backbone_plan, as ``headfleet backbone
plan`` runs it) against MiniLM's ONNX int8 export: every classifier's data embedded by both
backbones through their caches, two heads refit per classifier on the recorded split, holdout
compared, the shipped head refit and staged. A second plan with a new output shows the cache's
saving (no forward). The peer is the same embedding work without a shared cache: each classifier's
texts encoded on their own by the candidate backbone, measured on the first ``--peer`` classifiers
and scaled to N (the scaling is printed).

Checked before timing: the int8 candidate's vectors against the torch ones (cosine >= 0.99 on the
distinct texts). Goal (issue 15): <= 15 minutes for 1,000 classifiers on this 2-core CPU.

    .venv/bin/python bench/backbone_plan.py [--classifiers 1000] [--peer 10]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, check_vectors, report, sms_labelled  # noqa: E402

LABELINGS = {
    "spam": lambda t, lab: lab,
    "number": lambda t, lab: "number" if re.search(r"\d{3,}", t) else "none",
    "question": lambda t, lab: "question" if "?" in t else "statement",
    "long": lambda t, lab: "long" if len(t) > 80 else "short",
    "shouts": lambda t, lab: "shouts" if re.search(r"\b[A-Z]{3,}\b", t) else "calm",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classifiers", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--peer", type=int, default=10, help="classifiers the no-cache peer embeds (scaled to N)")
    args = ap.parse_args()
    title = f"backbone plan for {args.classifiers} head classifiers, torch fp32 -> ONNX int8"
    begin(title)

    from headfleet.embedder import Embedder
    from headfleet.engine import Engine
    from headfleet.heads import examples_from_records
    from headfleet.lifecycle.backbone_plan import plan
    from headfleet.settings import Settings

    texts, labels = sms_labelled()
    rng = random.Random(0)
    kinds = list(LABELINGS)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        settings = Settings(data_dir=data, device="cpu")
        chosen: list[list[int]] = []
        t0 = time.perf_counter()
        with Engine.open(settings) as engine:
            for i in range(args.classifiers):
                kind = kinds[i % len(kinds)]
                while True:  # a sample where every class has enough rows to split
                    rows = rng.sample(range(len(texts)), args.examples)
                    ys = [LABELINGS[kind](texts[j], labels[j]) for j in rows]
                    if min(ys.count(c) for c in set(ys)) >= 10 and len(set(ys)) == 2:
                        break
                engine.train("bench", f"c{i}", examples_from_records(
                    [{"text": texts[j], "label": y} for j, y in zip(rows, ys)]), seed=i)
                chosen.append(rows)
            current_fp = engine.embedder.fingerprint
        setup_s = time.perf_counter() - t0
        distinct = sorted({j for rows in chosen for j in rows})
        int8 = Embedder.load(backend="onnx", precision="int8", device="cpu", cache_dir=data / "onnx")
        torch_emb = Embedder.load(device="cpu")
        sample = [texts[j] for j in distinct[:256]]
        checks = [check_vectors("int8 vs torch fp32 on 256 of the fleet's texts", int8.embed(sample).vectors,
                                torch_emb.embed(sample).vectors, min_cosine=0.99)]
        del torch_emb
        runs = []
        for out in ("plan.json", "again.json"):
            before = int8.forwards
            t0 = time.perf_counter()
            with Engine.open(settings) as current, Engine.open(settings, embedder=int8) as candidate:
                assert current.embedder.fingerprint == current_fp
                doc = plan(current, candidate, ["bench"], out=Path(tmp) / out)
            runs.append((time.perf_counter() - t0, int8.forwards - before, doc))
        t0 = time.perf_counter()
        for rows in chosen[:args.peer]:
            int8.embed([texts[j] for j in rows])  # no shared cache: every classifier's texts again
        peer_s = (time.perf_counter() - t0) * args.classifiers / max(1, args.peer)
    (first_s, first_fw, doc), (second_s, second_fw, _) = runs
    s = doc["summary"]
    rows = [("check", line) for line in checks] + [
        ("fleet", f"{args.classifiers} classifiers x {args.examples} examples, {len(distinct)} distinct texts "
                  f"(trained in {setup_s:.0f} s, not timed)"),
        ("first plan", f"{first_s:.1f} s ({first_s / 60:.1f} min; goal <= 15 min), {first_fw} candidate forwards; "
                       f"verdicts: {s['pass']} pass, {s['regression']} regression"),
        ("second plan (cache warm)", f"{second_s:.1f} s, {second_fw} forwards: the cache saved "
                                     f"{100 * (1 - second_s / first_s):.0f} % of the time"),
        ("peer: embed per classifier, no shared cache", f"~{peer_s:.0f} s for the embedding alone (measured on "
                                                        f"{args.peer}, scaled x{args.classifiers / max(1, args.peer):.0f}): "
                                                        f"the first plan is {peer_s / first_s:.1f}x faster"),
    ]
    report(title, rows, {"first_s": round(first_s, 2), "second_s": round(second_s, 2), "distinct": len(distinct),
                         "peer_embed_s": round(peer_s, 1), "classifiers": args.classifiers,
                         "pass": s["pass"], "regression": s["regression"]})


if __name__ == "__main__":
    main()
