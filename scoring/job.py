"""A scoring job: every document of a store against a list of classifiers, resumable exactly once.

The job never embeds or scores by itself: it hands each chunk's texts to ``classify(tenant,
texts, classifiers, namespace=...)`` — ``Engine.classify`` on the command line, the service's
scheduler-backed classify in a server, an engine held by a Ray actor — so every kind of
classifier ``classify`` knows is scored the same way, through the same cache tiers.

    job = ScoreJob(spec, resolve=lambda tenant, ref: registry.resolve(tenant, ref))
    if job.state != "done":
        job.run(engine.classify, forwards=lambda: engine.embedder.forwards)
    print(format_report(job.report))

The store is cut into chunks of ``chunk_rows`` rows per file (bad rows included, so the cut is
the same in every run); a chunk is scored, written as a part, and committed by the checkpoint
(``headfleet.scoring.output``). Killed at any point, the same job started again resumes after
the last committed chunk, with the classifier versions it was pinned to when it first started.

``spec.root`` confines the job to a folder (the service: the tenant's scoring folder): every file
it opens — the store's files, the output, rejects, report, checkpoint and parts — is opened
beneath it (``headfleet.scoring.confined``), when the job is built and again each time it opens
the file. A file that leads outside then, such as one swapped for a symlink after the job was
submitted, fails the job with a ``ForbiddenError`` that names it relative to the root; nothing
of it is read, and no row of it reaches the output or the rejects file.

Here: opening (new, resume or done), the cursor, the run loop and the commit order. A chunk's
cut, pins and scoring are :mod:`headfleet.scoring.chunk`; the counts, progress, report and its
summary :mod:`headfleet.scoring.report`; the files on disk :mod:`headfleet.scoring.output`.
"""

from __future__ import annotations

import dataclasses
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from headfleet.errors import Cancelled, ConflictError, ValidationError
from headfleet.scoring import output
from headfleet.scoring.chunk import Classify, Resolve, ScoredChunk, file_starts, pin, score_rows
from headfleet.scoring.confined import Root
from headfleet.scoring.paths import refusing
from headfleet.scoring.report import add_chunk, build_report, format_report, new_counts, progress_of
from headfleet.scoring.rows import printable
from headfleet.scoring.sources import Source, SourceSpec

__all__ = ["Cancelled", "Classify", "JobSpec", "Resolve", "ScoreJob", "ScoredChunk", "format_report", "score_rows"]

PERSIST_EVERY_S = 300.0  # how often a long job saves the local vector store (a kill -9 loses at most this)
CHECKPOINT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What to score: a store, where the output goes (``out``; ``rejects`` beside it by default), whose
    classifiers, and ``chunk_rows`` rows per chunk (the unit of commit and resume)."""

    source: SourceSpec
    out: Path
    tenant: str
    classifiers: tuple[str, ...]
    format: str | None = None  # None: from the output's suffix
    rejects: Path | None = None  # None: <out stem>.rejects.jsonl beside the output
    namespace: str | None = None
    chunk_rows: int = 1024
    root: Path | None = None  # every file the job opens must resolve inside this folder (None: anywhere)


class ScoreJob:
    """One job's state on disk and in memory; ``state`` is ``"new"``, ``"resume"`` or ``"done"``."""

    def __init__(self, spec: JobSpec, *, resolve: Resolve, batch_size: int = 64, engine: str = "local",
                 restart: bool = False, overwrite: bool = False):
        if not spec.classifiers:
            raise ValidationError("name at least one classifier (-c NAME)")
        if spec.chunk_rows < 1:
            raise ValidationError("chunk rows must be at least 1")
        self.spec = spec
        self.batch_size = max(1, int(batch_size))
        self.engine = engine
        self.out = Path(spec.out)
        self.format = output.format_of(self.out, spec.format)
        if not self.format:
            raise ValidationError(f"cannot tell the output format of {str(self.out)!r}: end it in .parquet or "
                                  ".jsonl, or pass --format")
        stem = self.out.name.rsplit(".", 1)[0] if "." in self.out.name else self.out.name
        self.rejects_path = Path(spec.rejects) if spec.rejects else self.out.with_name(f"{stem}.rejects.jsonl")
        self.report_path = self.out.with_name(f"{stem}.report.json")
        columns = list(dict.fromkeys(spec.classifiers))
        for c in columns:
            if c in output.RESERVED:
                raise ValidationError(f"classifier {c!r} would collide with the output column {c!r}; "
                                      f"ask for it as '{c}@latest'")
        self.columns = columns
        self.fs = Root(spec.root)
        self.source = Source(spec.source, self.fs)
        self.identity = {"checkpoint_version": CHECKPOINT_VERSION, "source": self.source.identity(),
                         "tenant": spec.tenant, "namespace": spec.namespace, "classifiers": columns,
                         "format": self.format, "chunk_rows": spec.chunk_rows}
        self.workdir = output.Workdir(self.out, self.format, self.fs)
        self.report: dict[str, Any] | None = None
        self.dropped_parts = 0
        with refusing(f"output {str(self.out)!r}"):  # a path the filesystem refuses is the caller's to fix
            self._check_outputs()
            self._open(resolve, restart, overwrite)
        self.schema = output.schema(self.source.id_type, {c: self.pins[c]["multi_label"] for c in columns})
        self.total, self.total_exact = (None, False)
        self._run_started = time.monotonic()
        self._at_start = dict(self.counts)
        self._persisted = time.monotonic()

    # -- opening: new, resume or already done ---------------------------------------------------------
    def _check_outputs(self) -> None:
        """The output, rejects and report paths: none may be a folder (or lead outside the root)."""
        for what, path in (("output", self.out), ("rejects file", self.rejects_path), ("report", self.report_path)):
            st = self.fs.lookup(path)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise ValidationError(f"{what} {str(path)!r} is a folder; name a file")

    def _open(self, resolve: Resolve, restart: bool, overwrite: bool) -> None:
        wd = self.workdir
        if wd.exists():
            try:
                ckpt = wd.read_checkpoint()
            except (OSError, ValueError):
                ckpt = None
            if ckpt is not None and ckpt.get("identity") == self.identity and not restart:
                self.state = "resume"
                self.pins, self.counts = ckpt["pins"], ckpt["counts"]
                self.cursor = tuple(ckpt["cursor"])
                self.complete = bool(ckpt.get("complete"))
                self.dropped_parts = wd.drop_uncommitted(self.cursor) if not self.complete else 0
                return
            if not restart:
                what = _difference(ckpt.get("identity") if ckpt else None, self.identity)
                raise ConflictError(f"{wd.path} holds a partial output of another job ({what}); run that job again "
                                    "to finish it, or pass --restart to discard it and start this one")
            wd.remove()
        elif self.fs.lookup(self.out) is not None and not overwrite:
            previous = _read_json(self.fs, self.report_path)
            if previous is not None and previous.get("identity") == self.identity:
                self.state, self.report = "done", previous
                self.pins, self.counts, self.complete = previous["pins"], previous["counts"], True
                self.cursor = (len(self.source.files), 0)
                return
            raise ConflictError(f"{self.out} already exists; pass --overwrite to replace it")
        self.state = "new"
        self.pins = pin(resolve, self.spec.tenant, self.columns)
        self.counts = new_counts(self.columns)
        self.cursor = (0, 0)
        self.complete = False
        wd.create()
        self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        self.workdir.write_checkpoint({"identity": self.identity, "pins": self.pins, "cursor": list(self.cursor),
                                       "counts": self.counts, "complete": self.complete,
                                       "spec": {"source": self.spec.source.to_dict(), "out": str(self.out),
                                                "rejects": str(self.rejects_path), "engine": self.engine}})

    # -- reading the rest of the store ----------------------------------------------------------------
    def estimate_total(self) -> tuple[int, bool]:
        """Rows in the store (exact for Parquet and SQLite): the progress bar's and the ETA's total."""
        if self.total is None:
            self.total, self.total_exact = self.source.estimate_rows()
            self.total_exact = self.total_exact or self.source.kind == "jsonl"  # blank lines aside
            self.total = max(self.total, self.counts["documents"])
        return self.total, self.total_exact

    def file_label(self, file_index: int) -> str:
        """How rejects name file ``file_index``: relative to a folder store, else its name (bytes escaped)."""
        path = self.source.files[file_index]
        return printable(str(path.relative_to(self.source.root)) if self.source.is_folder else path.name)

    def chunks(self) -> Iterator[tuple[tuple[int, int], list]]:
        """``(key, rows)`` for every chunk from the cursor on, in source order."""
        n = self.spec.chunk_rows
        for fi, start in file_starts(self.cursor, len(self.source.files), n):
            key, rows = None, []
            for row in self.source.rows(fi, start):
                k = (fi, row[0] // n)
                if k != key and rows:
                    yield key, rows
                    rows = []
                key = k
                rows.append(row)
            if rows:
                yield key, rows

    # -- running ---------------------------------------------------------------------------------------
    def run(self, classify: Classify, *, forwards: Callable[[], int] | None = None,
            on_commit: Callable[["ScoreJob", ScoredChunk], None] | None = None,
            persist: Callable[[], None] | None = None, cancelled: Callable[[], bool] | None = None) -> dict:
        """Score every chunk not yet committed, then write the output; returns the report."""
        if self.state == "done":
            return self.report
        self.begin()
        if not self.complete:
            for key, rows in self.chunks():
                if cancelled is not None and cancelled():
                    raise Cancelled("the job was cancelled")
                scored = score_rows(classify, self.spec.tenant, self.pins, rows, key=key,
                                    file_label=self.file_label(key[0]), namespace=self.spec.namespace,
                                    forwards=forwards)
                self.commit(scored)
                if on_commit is not None:
                    on_commit(self, scored)
                if persist is not None and time.monotonic() - self._persisted > PERSIST_EVERY_S:
                    persist()
                    self._persisted = time.monotonic()
        return self.finish()

    def begin(self) -> None:
        """A run starts: count it, and time from here (docs/s and the ETA are this run's)."""
        self.counts["runs"] += 1
        self._run_started = time.monotonic()
        self._at_start = dict(self.counts)

    def commit(self, sc: ScoredChunk) -> None:
        """Write one chunk's part and rejects, then move the checkpoint past it."""
        if sc.key < self.cursor:
            raise RuntimeError(f"chunk {sc.key} is already committed (cursor {self.cursor})")
        tbl = output.table(self.schema, sc.ids, sc.truncated, sc.results) if sc.ids else None
        self.workdir.write_part(sc.key, tbl, sc.rejects)
        add_chunk(self.counts, sc, self.batch_size)
        self.cursor = (sc.key[0], sc.key[1] + 1)
        self.counts["elapsed_s"] = self._elapsed()
        self._save_checkpoint()

    def finish(self) -> dict:
        """All chunks committed: assemble the output and the rejects, write the report, drop the partial."""
        self.cursor = (len(self.source.files), 0)
        self.counts["elapsed_s"] = self._elapsed()
        if not self.complete:
            self.complete = True
            self._save_checkpoint()
        rows = self.workdir.assemble(self.schema, self.cursor, self.rejects_path)
        if rows != self.counts["scored"]:  # parts on disk disagree with the checkpoint: never ship that
            raise RuntimeError(f"{rows} rows assembled but {self.counts['scored']} documents were committed")
        self.report = build_report(self, self._at_start, self._wall())
        self.fs.write_bytes(self.report_path, output.json_bytes(self.report))
        self.workdir.remove()
        self.state = "done"
        return self.report

    # -- what the job says -----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """Counts so far with this run's rate (``docs_per_s``) and an ETA in seconds (``eta_s``, from the
        estimated total; None before :meth:`estimate_total` or while nothing moved)."""
        return progress_of(self.counts, self._at_start, self._wall(), self.total, self.total_exact)

    def _wall(self) -> float:
        """Seconds since this run began."""
        return time.monotonic() - self._run_started

    def _elapsed(self) -> float:
        """Seconds over all runs: the checkpoint's at this run's start, plus this run's."""
        return self._at_start["elapsed_s"] + self._wall()


def _read_json(fs: Root, path: Path) -> dict | None:
    import json

    try:
        return json.loads(fs.read_bytes(path).decode("utf-8"))
    except (OSError, ValueError):  # a path that leads outside the root is not an OSError: it is refused
        return None


def _difference(old: dict | None, new: dict) -> str:
    if old is None:
        return "its checkpoint is unreadable"
    diffs = []
    for k in new:
        if old.get(k) != new[k]:
            if k == "source" and isinstance(old.get(k), dict):
                sub = [s for s in new[k] if old[k].get(s) != new[k][s]]
                diffs.append("the source changed since it started" if sub == ["files_sha256"]
                             else f"source {', '.join(sub)} differ")
            else:
                diffs.append(f"{k} differs")
    return "; ".join(diffs) or "unknown difference"
