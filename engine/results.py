"""Results: every row against every resolved classifier (the fleet's batched head operation),
merged across embedding groups into one answer per text.
"""

from __future__ import annotations

import logging
import time

from headfleet.names import MISS, PARTIAL, TIER_NAMES
from headfleet.engine.types import EmbedBatch

log = logging.getLogger(__name__)


def merged_cache(tiers: list[str]) -> str:
    """One text's ``cache`` from what answered each embedding it needed (a tier name or "miss"):
    the slowest tier when every one was held, "miss" when none was, else "partial"."""
    held = [t for t in tiers if t != MISS]
    if not held:
        return MISS
    if len(held) < len(tiers):
        return PARTIAL
    return max(held, key=TIER_NAMES.index)


class ResultsMixin:
    def score_groups(self, parts: list[tuple[EmbedBatch, list[tuple[str, str, dict]]]],
                     resolved: list[tuple[str, str, dict]]) -> dict:
        """:meth:`score` per embedding group, merged into one answer in the order asked. A text's
        ``cache`` covers every embedding it needed (the shared one, each adapter's): the slowest tier
        that answered when a tier held all of them, "miss" when none was held (all computed), and
        "partial" when some were held and some computed. The cache report sums every namespace:
        its hits and misses count embeddings (texts x groups), ``computed`` distinct embeddings."""
        if len(parts) == 1:
            return self.score(*parts[0])
        outs = [self.score(batch, items) for batch, items in parts]
        order = [ref for ref, _, _ in resolved]
        results = []
        for i in range(len(outs[0]["results"])):
            rows = [o["results"][i] for o in outs]
            per = {}
            for r in rows:
                per.update(r["classifications"])
            results.append({"index": i, "truncated": any(r["truncated"] for r in rows),
                            "cache": merged_cache([r["cache"] for r in rows]),
                            "classifications": {ref: per[ref] for ref in order}})
        cache = {"hits": {}, "misses": 0, "computed": 0}
        for o in outs:
            for tier, n in o["cache"]["hits"].items():
                cache["hits"][tier] = cache["hits"].get(tier, 0) + n
            cache["misses"] += o["cache"]["misses"]
            cache["computed"] += o["cache"]["computed"]
        timing = dict(outs[0]["timing_ms"])  # queue, embed, adapter_load: one step for every group
        for phase in ("heads", "cache"):  # each group looked up its own namespace and ran its own heads
            timing[phase] = round(sum(o["timing_ms"].get(phase, 0.0) for o in outs), 3)
        return {"results": results, "cache": cache, "timing_ms": timing}


    def score(self, batch: EmbedBatch, resolved: list[tuple[str, str, dict]]) -> dict:
        """Every row of ``batch`` against every resolved classifier: label, scores, version; the cache report."""
        t0 = time.perf_counter()
        out = self.fleet.predict(batch.vectors, [key for _, key, _ in resolved])
        multi = out.multi_label.tolist()
        probs = out.probs.tolist()
        results = []
        for i in range(len(batch.tiers)):
            per = {}
            row = probs[i]
            for j, (ref, _, m) in enumerate(resolved):
                labels = out.labels[j]
                p = row[j][: len(labels)]
                entry = {"classifier": m["id"], "version": m["version"],
                         "scores": {lab: round(x, 6) for lab, x in zip(labels, p)}}
                if multi[j]:
                    entry["labels"] = [lab for lab, x in zip(labels, p) if x >= 0.5]
                else:
                    entry["label"] = labels[max(range(len(p)), key=p.__getitem__)]
                per[ref] = entry
            results.append({"index": i, "truncated": bool(batch.truncated[i]), "cache": batch.tiers[i] or MISS,
                            "classifications": per})
        timing = dict(batch.timing_ms, heads=(time.perf_counter() - t0) * 1e3)
        return {"results": results, "cache": batch.cache_report(),
                "timing_ms": {k: round(v, 3) for k, v in timing.items()}}

