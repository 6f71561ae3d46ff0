"""Scoring jobs in the service: ``POST /jobs`` scores a store in the tenant's scoring folder.

Paths are the tenant's own: a job reads and writes only under ``<scoring_root>/<tenant>/``
(``HEADFLEET_SCORING_ROOT``); anything that resolves outside it (``..``, an absolute path, a
symlink out) is refused with 403 before a job exists, and without naming the server's folders.
The store is opened, its columns checked and the classifiers pinned to versions when the job is
submitted, so a bad request is a 4xx at once, not a failed job later.

A job runs on its own worker thread; its texts go through the scheduler in the lane
``<tenant>#score``, so live traffic keeps its turns while a big store is scored. Job records
are JSON files beside the training jobs' (``<data_dir>/jobs/<tenant>/score_*.json``). A job that
was queued or running when the service stopped is resumed at the next start from its last
committed chunk (``headfleet.scoring``); ``DELETE /jobs/{id}`` cancels one between two chunks
and removes its partial output.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from headfleet.errors import ConflictError, ForbiddenError, HeadfleetError, NotFoundError, ValidationError
from headfleet.heads.atomic import write_json_atomic
from headfleet.heads.refs import check_name
from headfleet.scoring import Cancelled, JobSpec, ScoreJob, SourceSpec
from headfleet.scoring.output import Workdir

log = logging.getLogger(__name__)

CHUNK_ROWS = 512  # rows per committed chunk: a cancel or a stop waits for at most one chunk
SAVE_EVERY_S = 5.0  # how often a running job's record is rewritten with its progress
FINISHED = ("succeeded", "failed", "cancelled")
REPORT_KEYS = ("documents", "scored", "rejected", "rejects_by_reason", "truncated", "cache", "embeddings_computed",
               "backbone_forwards", "labels", "classifiers", "wall_s", "elapsed_s", "docs_per_s", "runs")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ScoringJobs:
    """Submit, run, poll and cancel scoring jobs; ``classify`` is the service's scheduler-backed one,
    called from the job's worker thread."""

    def __init__(self, engine, classify: Callable[..., dict], root: Path | None, records: Path, *,
                 batch_size: int = 64, workers: int = 1):
        self.engine = engine
        self.classify = classify
        self.root = Path(root).resolve() if root is not None else None
        self.records = Path(records)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self._live: dict[str, ScoreJob] = {}  # job id -> the running job (ids are random, unique)
        self._cancel: dict[tuple[str, str], threading.Event] = {}
        self._closing = threading.Event()
        self._submit_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="headfleet-score")
        self._futures = []
        self._recover()

    # -- paths ------------------------------------------------------------------------------------------
    def folder(self, tenant: str) -> Path:
        if self.root is None:
            raise ForbiddenError("scoring jobs are off on this server: the operator sets HEADFLEET_SCORING_ROOT "
                                 "(each tenant then reads and writes under <root>/<tenant>/)")
        return self.root / check_name(tenant, "tenant")

    def _inside(self, tenant: str, rel: str, what: str) -> Path:
        """``rel`` inside the tenant's folder, resolved (symlinks too); 403 for anything outside."""
        if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
            raise ValidationError(f"{what} must be a path inside your scoring folder")
        base = self.folder(tenant).resolve()
        path = (base / rel).resolve()
        if path != base and not path.is_relative_to(base):
            raise ForbiddenError(f"{what} {rel!r} is outside your scoring folder; give a path relative to it")
        return path

    def _for_tenant(self, tenant: str, message: str) -> str:
        """An error from the store or the job, in the API's words: paths relative to the tenant's
        folder (the server's folders are nobody's business), field names instead of CLI flags."""
        base = str(self.folder(tenant).resolve())
        message = message.replace(base + "/", "").replace(base, ".")
        for flag, field in (("--id-col", "id_col"), ("--text-col", "text_col"), ("--table", "table"),
                            ("--overwrite", "overwrite: true"), ("--format", "format")):
            message = message.replace(flag, field)
        return message

    def _relative(self, tenant: str, path: Path) -> str:
        return str(path.relative_to(self.folder(tenant).resolve()))

    # -- public -------------------------------------------------------------------------------------------
    def submit(self, tenant: str, req) -> dict[str, Any]:
        """Check the request (paths, store, columns, classifiers) and queue the job; 4xx on anything wrong."""
        job_id = "score_" + secrets.token_hex(8)
        if req.namespace is not None:
            check_name(req.namespace, "namespace")
        source = self._inside(tenant, req.source, "source")
        if not source.exists():
            raise NotFoundError(f"source {req.source!r} does not exist in your scoring folder")
        out = self._inside(tenant, req.output or f"scores/{job_id}.parquet", "output")
        if out == source or out.is_relative_to(source) or source.is_relative_to(out):
            raise ValidationError("output must not be inside the source (the next run would read it as documents)")
        rejects = out.with_name(out.name.rsplit(".", 1)[0] + ".rejects.jsonl")
        shown = self._relative(tenant, out)
        spec = JobSpec(SourceSpec(str(source), id_col=req.id_col, text_col=req.text_col, table=req.table),
                       out, tenant, tuple(req.classifiers), format=req.format, rejects=rejects,
                       namespace=req.namespace, chunk_rows=CHUNK_ROWS)
        with self._submit_lock:  # two requests for one output: the second sees the first one's partial output
            if Workdir(out, "").exists():
                raise ConflictError(f"output {shown!r} belongs to another job that has not finished")
            try:  # opens the store, pins versions, writes the checkpoint (and creates the output's folder)
                job = ScoreJob(spec, resolve=self.engine.registry.resolve, batch_size=self.batch_size,
                               engine="service", overwrite=req.overwrite)
            except HeadfleetError as exc:
                exc.message = self._for_tenant(tenant, exc.message)
                exc.args = (exc.message,)
                raise
        if job.state == "done":
            raise ConflictError(f"output {shown!r} already exists (the same job finished it); "
                                "pass \"overwrite\": true to score again")
        record = {"id": job_id, "type": "score", "state": "queued", "created": _now(), "started": None,
                  "finished": None, "source": self._relative(tenant, source), "output": shown,
                  "rejects": self._relative(tenant, job.rejects_path), "format": job.format,
                  "classifiers": {c: p["ref"] for c, p in job.pins.items()},
                  "id_col": req.id_col, "text_col": req.text_col, "table": req.table, "namespace": req.namespace,
                  "progress": {"documents": 0, "total": None, "total_exact": False, "fraction": 0.0},
                  "counts": None, "docs_per_s": None, "eta_s": None, "report": None, "error": None,
                  "spec": {"source": str(source), "out": str(out), "rejects": str(rejects), "format": req.format}}
        key = (tenant, job_id)
        with self._lock:
            self._jobs[key] = record
            self._cancel[key] = threading.Event()
        self._save(tenant, record)
        self._futures.append(self._pool.submit(self._run, tenant, job_id))
        return self._public(record)

    def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._jobs.get((tenant, job_id))
            if record is None:  # another tenant's job id gets the same answer as a made-up one
                raise NotFoundError(f"no job {job_id!r}")
            return self._public(record)

    def list(self, tenant: str) -> list[dict[str, Any]]:
        with self._lock:
            return [self._public(r) for (t, _), r in self._jobs.items() if t == tenant]

    def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        key = (tenant, job_id)
        with self._lock:
            record = self._jobs.get(key)
            if record is None:
                raise NotFoundError(f"no job {job_id!r}")
            if record["state"] in FINISHED:
                raise ConflictError(f"job {job_id!r} has already {record['state']}; there is nothing to cancel")
            self._cancel[key].set()
            if record["state"] == "queued":
                record.update(state="cancelled", finished=_now())
            else:
                record["state"] = "cancelling"  # the worker stops at the end of the chunk in flight
            snapshot = dict(record)
        self._save(tenant, snapshot)
        if snapshot["state"] == "cancelled":
            Workdir(Path(snapshot["spec"]["out"]), "").remove()
        return self._public(snapshot)

    def close(self) -> None:
        """Stop between chunks; jobs still queued or running are resumed at the next start."""
        self._closing.set()
        for ev in self._cancel.values():
            ev.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for f in self._futures:
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # cancelled futures, or a run that already logged its failure
                pass

    # -- running ------------------------------------------------------------------------------------------
    def _run(self, tenant: str, job_id: str) -> None:
        key = (tenant, job_id)
        cancel = self._cancel[key]
        with self._lock:
            record = self._jobs[key]
            if record["state"] in FINISHED or cancel.is_set():
                return
            record.update(state="running", started=record["started"] or _now())
            snapshot = dict(record)
        self._save(tenant, snapshot)
        sp = snapshot["spec"]
        spec = JobSpec(SourceSpec(sp["source"], id_col=snapshot["id_col"], text_col=snapshot["text_col"],
                                  table=snapshot["table"]), Path(sp["out"]), tenant,
                       tuple(snapshot["classifiers"]), format=sp["format"], rejects=Path(sp["rejects"]),
                       namespace=snapshot["namespace"], chunk_rows=CHUNK_ROWS)
        saved = [time.monotonic()]

        def on_commit(job: ScoreJob, _chunk) -> None:
            if time.monotonic() - saved[0] > SAVE_EVERY_S:
                saved[0] = time.monotonic()
                with self._lock:
                    snap = self._public(self._jobs[key])
                self._save(tenant, {**self._jobs[key], **{k: snap[k] for k in ("progress", "counts")}})

        try:
            # overwrite: the output was checked when the job was submitted; a restart may find it finished
            job = ScoreJob(spec, resolve=self.engine.registry.resolve, batch_size=self.batch_size, engine="service",
                           overwrite=False)
            with self._lock:
                self._live[job_id] = job
            job.estimate_total()  # counts lines of JSONL/CSV stores: here, not in the request
            report = job.run(self._classify, on_commit=on_commit, cancelled=cancel.is_set, persist=self._persist)
        except Cancelled:
            self._stopped(tenant, key)
            return
        except HeadfleetError as exc:
            if self._closing.is_set():
                return  # the scheduler went away under a chunk: resumed at the next start
            self._finish(tenant, key, "failed",
                         error={"error": self._for_tenant(tenant, exc.message), "error_type": exc.error_type})
            return
        except Exception as exc:  # a bug or the disk, not the request: say so, keep the service up
            log.exception("scoring job %s failed", job_id)
            if self._closing.is_set():
                return
            self._finish(tenant, key, "failed",
                         error={"error": self._for_tenant(tenant, f"internal error ({type(exc).__name__}: {exc})"),
                                "error_type": "internal_error"})
            return
        self._finish(tenant, key, "succeeded", report={k: report[k] for k in REPORT_KEYS})

    def _persist(self) -> None:
        local = getattr(self.engine, "local", None)
        if local is not None and local.dirty:
            local.save()

    def _classify(self, *args, **kwargs) -> dict:
        if self._closing.is_set():  # the scheduler is going away: leave the chunk for the next start
            raise Cancelled("the service is stopping")
        return self.classify(*args, **kwargs)

    def _stopped(self, tenant: str, key: tuple[str, str]) -> None:
        if self._closing.is_set():
            return  # not the user's cancel: the record stays running and the job resumes at start
        with self._lock:
            record = self._jobs[key]
        Workdir(Path(record["spec"]["out"]), "").remove()
        self._finish(tenant, key, "cancelled")

    def _finish(self, tenant: str, key: tuple[str, str], state: str, **changes: Any) -> None:
        with self._lock:
            record = self._jobs[key]
            public = self._public(record)
            record.update(state=state, finished=_now(), progress=public["progress"], counts=public["counts"],
                          docs_per_s=public["docs_per_s"], eta_s=None, **changes)
            self._live.pop(key[1], None)
            if state == "succeeded":
                n = record["progress"]["documents"]
                record["progress"] = {"documents": n, "total": n, "total_exact": True, "fraction": 1.0}
            snapshot = dict(record)
        self._save(tenant, snapshot)

    def _public(self, record: dict[str, Any]) -> dict[str, Any]:
        """What ``GET /jobs/{id}`` shows: live progress while running, never a server path. Caller holds the lock."""
        out = {k: v for k, v in record.items() if k != "spec"}
        job = self._live.get(record["id"])
        if job is not None and record["state"] in ("running", "cancelling"):
            p = job.progress()
            c = job.counts
            total = p["total"]
            out["progress"] = {"documents": p["documents"], "total": total, "total_exact": p["total_exact"],
                               "fraction": round(min(1.0, p["documents"] / total), 4) if total else None}
            out["counts"] = {"scored": c["scored"], "rejected": c["rejected"], "truncated": c["truncated"],
                             "hits": dict(c["hits"]), "misses": c["misses"], "computed": c["computed"]}
            out["docs_per_s"], out["eta_s"] = p["docs_per_s"], p["eta_s"]
        return json.loads(json.dumps(out))

    # -- records ------------------------------------------------------------------------------------------
    def _save(self, tenant: str, record: dict[str, Any]) -> None:
        folder = self.records / tenant
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{record['id']}.json", record)

    def _recover(self) -> None:
        if not self.records.is_dir():
            return
        for tdir in sorted(self.records.iterdir()):
            try:
                tenant = check_name(tdir.name, "tenant")
            except HeadfleetError:
                continue
            for path in sorted(tdir.glob("score_*.json")):
                try:
                    record = json.loads(path.read_text())
                except (OSError, ValueError):
                    log.warning("ignoring unreadable job record %s", path)
                    continue
                key = (tenant, record["id"])
                self._jobs[key] = record
                self._cancel[key] = threading.Event()
                if record.get("state") == "cancelling":
                    Workdir(Path(record["spec"]["out"]), "").remove()
                    record.update(state="cancelled", finished=_now())
                    self._save(tenant, record)
                elif record.get("state") in ("queued", "running"):
                    log.info("resuming scoring job %s of tenant %s", record["id"], tenant)
                    record["state"] = "queued"
                    self._futures.append(self._pool.submit(self._run, tenant, record["id"]))


def scheduler_classify(service, loop) -> Callable[..., dict]:
    """``classify`` for a job's worker thread: the service's classify on its event loop, in the
    tenant's scoring lane, without the per-request limits (the job sizes its own calls) or admission
    control (one chunk in flight per job)."""
    import asyncio

    def classify(tenant: str, texts: list[str], classifiers: list[str], namespace: str | None = None) -> dict:
        coro = service.classify(tenant, texts, classifiers, namespace=namespace, lane=f"{tenant}#score",
                                admit=False, check=False)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    return classify
