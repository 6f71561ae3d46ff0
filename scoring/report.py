"""A job's counts, as its checkpoint carries them, and the progress, report and summary made from them.

The guarantee: the counts are additive over committed chunks only, so a job killed and resumed
reports what one uninterrupted run would (its wall time and rate aside, which are this run's).
How it is kept:

    new_counts(columns)        zeros, saved in the first checkpoint
    add_chunk(counts, chunk)   per committed chunk, before the checkpoint that commits it:
                                 documents += good + rejected; per document a hit of a tier, a
                                 miss, or partial (a LoRA classifier's embedding held, another's not)
                                 forwards_run += measured forwards, else ceil(computed / batch_size)
                                 forwards_saved += ceil(good / batch_size) - ceil(computed / batch_size)
                                 labels[column][label] += 1 (multi-label: each label; none: "(none)")
    progress_of / build_report read the counts, with this run's start (``at_start``) and wall time
    format_report              the report as the CLI prints it
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from headfleet.names import PARTIAL, TIER_NAMES as TIERS
from headfleet.scoring.chunk import ScoredChunk

if TYPE_CHECKING:
    from headfleet.scoring.job import ScoreJob


def new_counts(columns: Sequence[str]) -> dict[str, Any]:
    """A new job's counts: zero documents, a zero hit count per cache tier, an empty label
    distribution per output column."""
    return {"documents": 0, "scored": 0, "rejected": 0, "rejects_by_reason": {}, "truncated": 0,
            "hits": {t: 0 for t in TIERS}, "misses": 0, "partial": 0, "computed": 0, "forwards_run": 0,
            "forwards_measured": True, "forwards_saved": 0, "labels": {c: {} for c in columns},
            "elapsed_s": 0.0, "runs": 0}


def add_chunk(c: dict[str, Any], sc: ScoredChunk, batch_size: int) -> None:
    """Add one committed chunk to the counts ``c`` in place; ``batch_size``: the backbone's batch, for
    forwards the caller could not count and for the forwards the cache saved."""
    n_good = len(sc.ids)
    c["documents"] += n_good + len(sc.rejects)
    c["scored"] += n_good
    c["rejected"] += len(sc.rejects)
    for r in sc.rejects:
        c["rejects_by_reason"][r["reason"]] = c["rejects_by_reason"].get(r["reason"], 0) + 1
    c["truncated"] += sum(sc.truncated)
    c.setdefault("partial", 0)  # a checkpoint written before partial was counted apart
    for t in sc.tiers:
        if t in c["hits"]:
            c["hits"][t] += 1
        elif t == PARTIAL:
            c["partial"] += 1
        else:
            c["misses"] += 1
    c["computed"] += sc.computed
    bs = batch_size
    run = sc.forwards if sc.forwards is not None else math.ceil(sc.computed / bs)
    if sc.forwards is None and n_good:
        c["forwards_measured"] = False
    c["forwards_run"] += run
    # a run without the cache would embed every scored document of the chunk, in batches of bs
    c["forwards_saved"] += max(0, math.ceil(n_good / bs) - math.ceil(sc.computed / bs))
    for col, cols in sc.results.items():
        dist = c["labels"][col]
        if "labels" in cols:
            labels = [lab for labs in cols["labels"] for lab in (labs or ["(none)"])]
        else:
            labels = cols["label"]
        for lab in labels:
            dist[lab] = dist.get(lab, 0) + 1


def progress_of(c: dict[str, Any], at_start: dict[str, Any], wall_s: float, total: int | None,
                total_exact: bool) -> dict[str, Any]:
    """Counts so far with this run's rate (documents/s over ``wall_s`` seconds since ``at_start``) and an
    ETA in seconds from the estimated ``total`` (None while the total is unknown or nothing moved)."""
    done_run = c["documents"] - at_start["documents"]
    rate = done_run / wall_s if wall_s > 0 else 0.0
    eta = None
    if total is not None and rate > 0:
        eta = max(0.0, (total - c["documents"]) / rate)
    lookups = c["scored"]
    return {"documents": c["documents"], "total": total, "total_exact": total_exact,
            "scored": c["scored"], "rejected": c["rejected"], "hit_rate": _ratio(sum(c["hits"].values()), lookups),
            "docs_per_s": round(rate, 2), "eta_s": round(eta, 1) if eta is not None else None}


def build_report(job: ScoreJob, at_start: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The finished job's report (written beside the output as ``<stem>.report.json``): counts, cache
    hits, forwards, label distributions, times in seconds (``wall_s``: this run's), the pins and identity."""
    c = job.counts
    run_docs = c["documents"] - at_start["documents"]
    hits = sum(c["hits"].values())
    return {
        "output": str(job.out), "rejects_file": str(job.rejects_path), "format": job.format,
        "engine": job.engine,
        "classifiers": {col: p["ref"] for col, p in job.pins.items()},
        "documents": c["documents"], "scored": c["scored"], "rejected": c["rejected"],
        "rejects_by_reason": c["rejects_by_reason"], "truncated": c["truncated"],
        # hit_rate: documents whose every embedding was held; partial ones count in neither
        "cache": {"hits": dict(c["hits"]), "misses": c["misses"], "partial": c.get("partial", 0),
                  "hit_rate": _ratio(hits, c["scored"])},
        "embeddings_computed": c["computed"],
        "backbone_forwards": {"run": c["forwards_run"], "saved": c["forwards_saved"],
                              "measured": c["forwards_measured"]},
        "labels": c["labels"],
        "wall_s": round(wall_s, 3), "elapsed_s": round(c["elapsed_s"], 3),
        "docs_per_s": round(run_docs / wall_s, 2) if wall_s > 0 else None,
        "runs": c["runs"], "resumed_at": at_start["documents"],
        "this_run": {"documents": run_docs, "embeddings_computed": c["computed"] - at_start["computed"]},
        "identity": job.identity, "pins": job.pins, "counts": c,
    }


def format_report(report: dict) -> str:
    """The report as the CLI prints it: a few lines of counts, cache hits per tier, forwards, times,
    one line of label distribution per classifier, then the output and rejects paths."""
    cache = report["cache"]
    fw = report["backbone_forwards"]
    lines = [
        f"documents: {report['documents']:,}   scored: {report['scored']:,}   rejected: {report['rejected']:,}"
        + (f" ({', '.join(f'{k} {v:,}' for k, v in report['rejects_by_reason'].items())})"
           if report["rejected"] else "")
        + (f"   truncated: {report['truncated']:,}" if report["truncated"] else ""),
        "cache hits: " + ", ".join(f"{t} {cache['hits'][t]:,}" for t in TIERS)
        + f"   misses: {cache['misses']:,}"
        + (f"   partial: {cache['partial']:,}" if cache.get("partial") else "")
        + f"   hit rate: {cache['hit_rate']:.1%}",
        f"embeddings computed: {report['embeddings_computed']:,}   backbone forwards: {fw['run']:,} run"
        + ("" if fw["measured"] else " (estimated)") + f", {fw['saved']:,} saved by the cache",
        f"wall time: {report['wall_s']:.1f} s   documents/s: {report['docs_per_s'] or 0:,.1f}"
        + (f"   (run {report['runs']}, resumed after {report['resumed_at']:,} documents; "
           f"{report['elapsed_s']:.1f} s over all runs)" if report["resumed_at"] else ""),
    ]
    for col, dist in report["labels"].items():
        total = sum(dist.values()) or 1
        parts = ", ".join(f"{lab} {n:,} ({n / total:.1%})" for lab, n in sorted(dist.items(), key=lambda kv: -kv[1]))
        lines.append(f"{col} ({report['classifiers'][col]}): {parts or '-'}")
    lines.append(f"output: {report['output']}   rejects: {report['rejects_file']}")
    return "\n".join(lines)


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0
