"""The command line's progress bar for a scoring job: documents, docs/s, cache hit rate, ETA (tqdm, stderr)."""

from __future__ import annotations

import sys

from headfleet.scoring.chunk import Classify, ScoredChunk
from headfleet.scoring.job import ScoreJob


class ScoreProgress:
    """``with ScoreProgress(job) as bar``: ``bar.classify(f)`` moves the bar as texts are embedded,
    ``bar.on_commit`` adds a chunk's rejects (or the whole chunk when nothing moved it) and the hit rate."""

    def __init__(self, job: ScoreJob, *, enabled: bool = True, min_total: int = 300):
        self.job = job
        total, exact = job.estimate_total()
        self.enabled = enabled and total > min_total
        self._bar = None
        self._moved = 0  # documents the classify callback reported for the chunk in flight
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=job.counts["documents"], unit="doc", file=sys.stderr,
                             desc="scoring" if exact else "scoring (total estimated)", dynamic_ncols=True,
                             smoothing=0.05)

    def __enter__(self) -> "ScoreProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def classify(self, classify: Classify) -> Classify:
        """``classify`` with a ``progress`` callback feeding the bar (Engine.classify takes one)."""
        if self._bar is None:
            return classify

        def run(tenant, texts, classifiers, **kwargs):
            return classify(tenant, texts, classifiers, progress=self._advance, **kwargs)

        return run

    def _advance(self, n: int) -> None:
        self._moved += n
        self._bar.update(n)

    def on_commit(self, job: ScoreJob, chunk: ScoredChunk) -> None:
        if self._bar is None:
            return
        rest = len(chunk.ids) + len(chunk.rejects) - self._moved
        self._moved = 0
        if rest > 0:
            self._bar.update(rest)
        if self._bar.total is not None and self._bar.n > self._bar.total:
            self._bar.total = self._bar.n  # the estimate was low (a CSV without multi-line records)
        p = job.progress()
        self._bar.set_postfix_str(f"hit rate {p['hit_rate']:.0%}, rejected {p['rejected']:,}", refresh=False)
