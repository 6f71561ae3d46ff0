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
"""

from __future__ import annotations

import dataclasses
import math
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from headfleet.cache.base import TIER_NAMES as TIERS
from headfleet.errors import Cancelled, ConflictError, ValidationError
from headfleet.scoring import output
from headfleet.scoring.confined import Root, refusing
from headfleet.scoring.sources import Source, SourceSpec, printable

PERSIST_EVERY_S = 300.0  # how often a long job saves the local vector store (a kill -9 loses at most this)
CHECKPOINT_VERSION = 1

Classify = Callable[..., dict]  # (tenant, texts, classifiers, namespace=None) -> Engine.classify's answer
Resolve = Callable[[str, str], dict]  # (tenant, ref) -> the version's manifest


@dataclasses.dataclass(frozen=True)
class JobSpec:
    source: SourceSpec
    out: Path
    tenant: str
    classifiers: tuple[str, ...]
    format: str | None = None  # None: from the output's suffix
    rejects: Path | None = None  # None: <out stem>.rejects.jsonl beside the output
    namespace: str | None = None
    chunk_rows: int = 1024
    root: Path | None = None  # every file the job opens must resolve inside this folder (None: anywhere)


@dataclasses.dataclass
class ScoredChunk:
    """One chunk after classify: what its part holds and what its counts add."""

    key: tuple[int, int]  # (file index, chunk index)
    ids: list
    truncated: list[bool]
    results: dict[str, dict[str, list]]  # output column -> {"label": [...], "score": [...], "version": [...]}
    #                                      (multi-label: "labels", "scores", "version"), one entry per document
    rejects: list[dict]
    tiers: list[str]  # per scored document: memory | local | redis | miss
    computed: int  # embeddings the backbone computed for this chunk
    forwards: int | None  # backbone forward passes, when the caller could count them


def _new_counts(columns: Sequence[str]) -> dict[str, Any]:
    return {"documents": 0, "scored": 0, "rejected": 0, "rejects_by_reason": {}, "truncated": 0,
            "hits": {t: 0 for t in TIERS}, "misses": 0, "computed": 0, "forwards_run": 0,
            "forwards_measured": True, "forwards_saved": 0, "labels": {c: {} for c in columns},
            "elapsed_s": 0.0, "runs": 0}


def pin(resolve: Resolve, tenant: str, refs: Sequence[str]) -> dict[str, dict]:
    """Each ref as asked -> the version it names now; a resumed job keeps these."""
    pins = {}
    for ref in refs:
        m = resolve(tenant, ref)
        pins[ref] = {"ref": f"{m['name']}@{m['version']}", "name": m["name"], "version": int(m["version"]),
                     "multi_label": bool(m.get("multi_label", False)), "labels": list(m.get("labels", []))}
    return pins


def _columns(pins: dict[str, dict]) -> dict[str, dict[str, list]]:
    return {c: ({"labels": [], "scores": [], "version": []} if p["multi_label"] else
                {"label": [], "score": [], "version": []}) for c, p in pins.items()}


def _append(cols: dict[str, list], entry: dict) -> None:
    """Engine.classify's per-classifier entry -> the output's ``label, score, version`` columns."""
    if "labels" in cols:
        cols["labels"].append(entry["labels"])
        cols["scores"].append([entry["scores"][lab] for lab in entry["labels"]])
    else:
        cols["label"].append(entry["label"])
        cols["score"].append(entry["scores"][entry["label"]])
    cols["version"].append(entry["version"])


def classify_good(classify: Classify, tenant: str, pins: dict[str, dict], texts: list[str], *,
                  namespace: str | None = None, forwards: Callable[[], int] | None = None) -> tuple[list, int, int | None]:
    """``texts`` through ``classify`` with every pinned version: (per-text results, embeddings computed,
    backbone forwards run or None)."""
    if not texts:
        return [], 0, (0 if forwards is not None else None)
    refs = list(dict.fromkeys(p["ref"] for p in pins.values()))
    before = forwards() if forwards is not None else None
    kwargs = {"namespace": namespace} if namespace is not None else {}
    out = classify(tenant, texts, refs, **kwargs)
    n_forwards = forwards() - before if before is not None else None
    return out["results"], int(out["cache"]["computed"]), n_forwards


def scored_chunk(key: tuple[int, int], rows: list, results: list, computed: int, forwards: int | None,
                 pins: dict[str, dict], file_label: str) -> ScoredChunk:
    """Rows ``(pos, id, text, reject)`` and ``classify``'s results for the good ones, in order -> a ScoredChunk."""
    good_ids = [r[1] for r in rows if r[3] is None]
    if len(good_ids) != len(results):
        raise RuntimeError(f"{len(results)} results for {len(good_ids)} documents in chunk {key}")
    rejects = [{"file": file_label, "row": r[0], **r[3]} for r in rows if r[3] is not None]
    cols = _columns(pins)
    truncated, tiers = [], []
    for res in results:
        per = res["classifications"]
        for c, p in pins.items():
            _append(cols[c], per[p["ref"]])
        truncated.append(bool(res["truncated"]))
        tiers.append(res["cache"])
    return ScoredChunk(key, good_ids, truncated, cols, rejects, tiers, computed, forwards)


def score_rows(classify: Classify, tenant: str, pins: dict[str, dict], rows: list, *, key: tuple[int, int],
               file_label: str, namespace: str | None = None, forwards: Callable[[], int] | None = None) -> ScoredChunk:
    """Rows ``(pos, id, text, reject)`` -> a ScoredChunk: good rows through ``classify``, bad ones to rejects."""
    results, computed, n_forwards = classify_good(classify, tenant, pins, [r[2] for r in rows if r[3] is None],
                                                  namespace=namespace, forwards=forwards)
    return scored_chunk(key, rows, results, computed, n_forwards, pins, file_label)


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
        self.counts = _new_counts(self.columns)
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
        path = self.source.files[file_index]
        return printable(str(path.relative_to(self.source.root)) if self.source.is_folder else path.name)

    def chunks(self) -> Iterator[tuple[tuple[int, int], list]]:
        """``(key, rows)`` for every chunk from the cursor on, in source order."""
        n = self.spec.chunk_rows
        f0, c0 = self.cursor
        for fi in range(f0, len(self.source.files)):
            start = c0 * n if fi == f0 else 0
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
        c = self.counts
        n_good = len(sc.ids)
        c["documents"] += n_good + len(sc.rejects)
        c["scored"] += n_good
        c["rejected"] += len(sc.rejects)
        for r in sc.rejects:
            c["rejects_by_reason"][r["reason"]] = c["rejects_by_reason"].get(r["reason"], 0) + 1
        c["truncated"] += sum(sc.truncated)
        for t in sc.tiers:
            if t in c["hits"]:
                c["hits"][t] += 1
            else:
                c["misses"] += 1
        c["computed"] += sc.computed
        bs = self.batch_size
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
        self.cursor = (sc.key[0], sc.key[1] + 1)
        c["elapsed_s"] = self._at_start["elapsed_s"] + (time.monotonic() - self._run_started)
        self._save_checkpoint()

    def finish(self) -> dict:
        """All chunks committed: assemble the output and the rejects, write the report, drop the partial."""
        self.cursor = (len(self.source.files), 0)
        self.counts["elapsed_s"] = self._at_start["elapsed_s"] + (time.monotonic() - self._run_started)
        if not self.complete:
            self.complete = True
            self._save_checkpoint()
        rows = self.workdir.assemble(self.schema, self.cursor, self.rejects_path)
        if rows != self.counts["scored"]:  # parts on disk disagree with the checkpoint: never ship that
            raise RuntimeError(f"{rows} rows assembled but {self.counts['scored']} documents were committed")
        self.report = self._report()
        self.fs.write_bytes(self.report_path, output.json_bytes(self.report))
        self.workdir.remove()
        self.state = "done"
        return self.report

    # -- what the job says -----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """Counts so far with this run's rate and an ETA (from the estimated total)."""
        c = self.counts
        wall = time.monotonic() - self._run_started
        done_run = c["documents"] - self._at_start["documents"]
        rate = done_run / wall if wall > 0 else 0.0
        total = self.total
        eta = None
        if total is not None and rate > 0:
            eta = max(0.0, (total - c["documents"]) / rate)
        lookups = c["scored"]
        return {"documents": c["documents"], "total": total, "total_exact": self.total_exact,
                "scored": c["scored"], "rejected": c["rejected"], "hit_rate": _ratio(sum(c["hits"].values()), lookups),
                "docs_per_s": round(rate, 2), "eta_s": round(eta, 1) if eta is not None else None}

    def _report(self) -> dict[str, Any]:
        c = self.counts
        wall = time.monotonic() - self._run_started
        run_docs = c["documents"] - self._at_start["documents"]
        hits = sum(c["hits"].values())
        return {
            "output": str(self.out), "rejects_file": str(self.rejects_path), "format": self.format,
            "engine": self.engine,
            "classifiers": {col: p["ref"] for col, p in self.pins.items()},
            "documents": c["documents"], "scored": c["scored"], "rejected": c["rejected"],
            "rejects_by_reason": c["rejects_by_reason"], "truncated": c["truncated"],
            "cache": {"hits": dict(c["hits"]), "misses": c["misses"], "hit_rate": _ratio(hits, c["scored"])},
            "embeddings_computed": c["computed"],
            "backbone_forwards": {"run": c["forwards_run"], "saved": c["forwards_saved"],
                                  "measured": c["forwards_measured"]},
            "labels": c["labels"],
            "wall_s": round(wall, 3), "elapsed_s": round(c["elapsed_s"], 3),
            "docs_per_s": round(run_docs / wall, 2) if wall > 0 else None,
            "runs": c["runs"], "resumed_at": self._at_start["documents"],
            "this_run": {"documents": run_docs, "embeddings_computed": c["computed"] - self._at_start["computed"]},
            "identity": self.identity, "pins": self.pins, "counts": c,
        }


def format_report(report: dict) -> str:
    """The report as the CLI prints it."""
    cache = report["cache"]
    fw = report["backbone_forwards"]
    lines = [
        f"documents: {report['documents']:,}   scored: {report['scored']:,}   rejected: {report['rejected']:,}"
        + (f" ({', '.join(f'{k} {v:,}' for k, v in report['rejects_by_reason'].items())})"
           if report["rejected"] else "")
        + (f"   truncated: {report['truncated']:,}" if report["truncated"] else ""),
        "cache hits: " + ", ".join(f"{t} {cache['hits'][t]:,}" for t in TIERS)
        + f"   misses: {cache['misses']:,}   hit rate: {cache['hit_rate']:.1%}",
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
