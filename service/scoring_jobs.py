"""Scoring jobs in the service: ``POST /jobs`` scores a store in the tenant's scoring folder.

Paths are the tenant's own: a job reads and writes only under ``<scoring_root>/<tenant>/``
(``HEADFLEET_SCORING_ROOT``). The job is confined to that folder (``JobSpec.root``): every file it
opens, at submit and while it runs, is opened beneath it with every path component resolved by
the kernel (``headfleet.scoring.confined``), so anything that leads outside it (``..``, an absolute
path, a symlink out anywhere on the way, in a folder source too, a symlinked tenant folder) is
refused with 403 before a job exists, and without naming the server's folders. Symlinks that
stay inside the folder are followed. A path the filesystem refuses (too long, a loop, a file
where a folder should be, no permission, not valid Unicode) is a 4xx too, never a 500.

The store is opened, its columns checked and the classifiers pinned to versions when the job is
submitted, so a bad request is a 4xx at once, not a failed job later. What changes after that is
checked again when the job opens each file: a file swapped for a symlink out after submit fails
the job (``error_type`` ``forbidden``, the file named relative to the tenant's folder), and none
of its bytes reach the output or the rejects file. A failed job's partial output is removed (a
failed job is not resumed), so the output path can be used again.

A job runs on its own worker thread; its texts go through the scheduler in the lane
``<tenant>#score``, so live traffic keeps its turns while a big store is scored. Job records
are JSON files beside the training jobs' (``<data_dir>/jobs/<tenant>/score_*.json``), each with its
owner's lease (``job_records``), so replicas sharing the folder run every job once: a job whose
owner stopped (a clean stop, a crash, a killed replica) is resumed from its last committed chunk
(``headfleet.scoring``) by the first replica to sweep after that (every ``sweep_s``; the restart
of a single process at its start), and never while its owner is alive and renewing.
``DELETE /jobs/{id}`` cancels one between two chunks and removes its partial output; sent to a
replica that does not run the job, it marks the record (``cancel_requested``) and the owner stops
at its next heartbeat (``lease_s / 3``). Any replica answers ``GET /jobs/{id}``: the owner from
memory, the others from the record, rewritten with the progress at every heartbeat.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from headfleet.errors import ConflictError, ForbiddenError, HeadfleetError, NotFoundError, ValidationError, clip_message
from headfleet.service.job_records import UNFINISHED, JobRecords, LeaseLost
from headfleet.names import check_name
from headfleet.scoring import Cancelled, JobSpec, ScoreJob, SourceSpec
from headfleet.scoring.confined import Escape, Root, path_error
from headfleet.scoring.output import Workdir

log = logging.getLogger(__name__)

CHUNK_ROWS = 512  # rows per committed chunk: a cancel or a stop waits for at most one chunk
SAVE_EVERY_S = 5.0  # how often a running job's record is rewritten with its progress
SWEEP_S = 2.0  # how often leases are renewed (at most) and orphaned jobs looked for
FINISHED = ("succeeded", "failed", "cancelled")
REPORT_KEYS = ("documents", "scored", "rejected", "rejects_by_reason", "truncated", "cache", "embeddings_computed",
               "backbone_forwards", "labels", "classifiers", "wall_s", "elapsed_s", "docs_per_s", "runs")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ScoringJobs:
    """Submit, run, poll and cancel scoring jobs; ``classify`` is the service's scheduler-backed one,
    called from the job's worker thread."""

    def __init__(self, engine, classify: Callable[..., dict], root: Path | None, records: Path, *,
                 batch_size: int = 64, workers: int = 1, lease_s: float | None = None, sweep_s: float = SWEEP_S):
        self.engine = engine
        self.classify = classify
        self.root = Path(root).resolve() if root is not None else None
        self.records = JobRecords(records) if lease_s is None else JobRecords(records, lease_s=lease_s)
        self.sweep_s = min(float(sweep_s), self.records.lease_s / 3)
        self._lost: set[str] = set()  # job ids another replica took over while this one ran them
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self._live: dict[str, ScoreJob] = {}  # job id -> the running job (ids are random, unique)
        self._cancel: dict[tuple[str, str], threading.Event] = {}
        self._closing = threading.Event()
        self._submit_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="headfleet-score")
        self._futures = []
        self.records.hold()
        self._sweep()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="headfleet-score-leases", daemon=True)
        self._sweeper.start()

    # -- paths ------------------------------------------------------------------------------------------
    def folder(self, tenant: str) -> Path:
        if self.root is None:
            raise ForbiddenError("scoring jobs are off on this server: the operator sets HEADFLEET_SCORING_ROOT "
                                 "(each tenant then reads and writes under <root>/<tenant>/)")
        return self.root / check_name(tenant, "tenant")

    def confined(self, tenant: str) -> Root:
        """The tenant's folder as the root every file of its jobs is opened beneath."""
        return Root(self.folder(tenant))

    def _inside(self, tenant: str, rel: Any, what: str, *, must_exist: bool = False) -> tuple[Path, PurePosixPath]:
        """``rel`` inside the tenant's folder: lexically (no ``..`` above it, not absolute), then every
        component that exists resolved beneath the folder, symlinks too; 403 for anything outside,
        4xx for a path the filesystem refuses. Returns the lexical path (the job opens it beneath
        the folder again each time) and the real one, relative to the folder."""
        if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
            raise ValidationError(f"{what} must be a path inside your scoring folder")
        outside = ForbiddenError(f"{what} {rel!r} is outside your scoring folder; give a path relative to it")
        norm = os.path.normpath(rel)
        if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
            raise outside
        fs = self.confined(tenant)
        path = self.folder(tenant) / norm if norm != "." else self.folder(tenant)
        try:
            real = fs.realpath(path)
            if must_exist and fs.lookup(path) is None:
                raise NotFoundError(f"{what} {rel!r} does not exist in your scoring folder")
        except Escape as exc:
            raise (outside if exc.path is not None else self._reworded(tenant, exc)) from None
        except HeadfleetError as exc:
            raise self._reworded(tenant, exc) from None
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the tenant's folder itself is missing
                raise NotFoundError(f"{what} {rel!r} does not exist in your scoring folder") from None
            raise self._path_error(exc, f"{what} {rel!r}") from None
        return path, real

    def _path_error(self, exc: OSError, what: str) -> HeadfleetError:
        err = path_error(exc, what)
        if err is None:
            raise exc
        return err

    def _reworded(self, tenant: str, exc: HeadfleetError) -> HeadfleetError:
        exc.message = self._for_tenant(tenant, exc.message)
        exc.args = (exc.message,)
        return exc

    def _for_tenant(self, tenant: str, message: str) -> str:
        """An error from the store or the job, in the API's words: paths relative to the tenant's
        folder (the server's folders are nobody's business), field names instead of CLI flags."""
        folder = self.folder(tenant)
        for base in dict.fromkeys((str(folder), os.path.realpath(folder), str(self.root))):
            message = message.replace(base + "/", "").replace(base, ".")
        for flag, field in (("--id-col", "id_col"), ("--text-col", "text_col"), ("--table", "table"),
                            ("--overwrite", "overwrite: true"), ("--format", "format"),
                            ("the job's folder", "your scoring folder")):
            message = message.replace(flag, field)
        return clip_message(message)

    def _relative(self, tenant: str, path: Path) -> str:
        return str(path.relative_to(self.folder(tenant)))

    # -- public -------------------------------------------------------------------------------------------
    def submit(self, tenant: str, req) -> dict[str, Any]:
        """Check the request (paths, store, columns, classifiers) and queue the job; 4xx on anything wrong."""
        job_id = "score_" + secrets.token_hex(8)
        if req.namespace is not None:
            check_name(req.namespace, "namespace")
        fs = self.confined(tenant)
        source, real_source = self._inside(tenant, req.source, "source", must_exist=True)
        out, real_out = self._inside(tenant, req.output or f"scores/{job_id}.parquet", "output")
        # compared with links resolved: a link cannot hide that the output is inside the source
        if real_out == real_source or real_out.is_relative_to(real_source) or real_source.is_relative_to(real_out):
            raise ValidationError("output must not be inside the source (the next run would read it as documents)")
        rejects = out.with_name(out.name.rsplit(".", 1)[0] + ".rejects.jsonl")
        shown = self._relative(tenant, out)
        spec = JobSpec(SourceSpec(str(source), id_col=req.id_col, text_col=req.text_col, table=req.table),
                       out, tenant, tuple(req.classifiers), format=req.format, rejects=rejects,
                       namespace=req.namespace, chunk_rows=CHUNK_ROWS, root=self.folder(tenant))
        with self._submit_lock:  # two requests for one output: the second sees the first one's partial output
            try:
                if Workdir(out, "", fs).exists():
                    raise ConflictError(f"output {shown!r} belongs to another job that has not finished")
                # opens the store, pins versions, writes the checkpoint (and creates the output's folder)
                job = ScoreJob(spec, resolve=self.engine.registry.resolve, batch_size=self.batch_size,
                               engine="service", overwrite=req.overwrite)
            except HeadfleetError as exc:
                raise self._reworded(tenant, exc) from None
            except OSError as exc:  # what the scoring layer did not word: still the request's path, not a 500
                raise self._path_error(exc, f"output {shown!r}") from None
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
        record["restarts"] = 0
        with self._lock:
            self._jobs[key] = record
            self._cancel[key] = threading.Event()
        self.records.create(tenant, record)
        self._futures.append(self._pool.submit(self._run, tenant, job_id))
        return self._public(record)

    def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        """The job from memory when this replica runs it, else its record as the owner last wrote it;
        NotFoundError for another tenant's id and a made-up one alike."""
        with self._lock:
            record = self._jobs.get((tenant, job_id))
            if record is not None:
                return self._public(record)
        record = self.records.read(tenant, job_id) if job_id.startswith("score_") else None
        if record is None:  # another tenant's job id gets the same answer as a made-up one
            raise NotFoundError(f"no job {job_id!r}")
        with self._lock:
            return self._public(record)

    def list(self, tenant: str) -> list[dict[str, Any]]:
        records = {r["id"]: r for _, r in self.records.load("score_", tenant)}
        with self._lock:
            records.update({i: r for (t, i), r in self._jobs.items() if t == tenant})
            return [self._public(r) for r in records.values()]

    def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        key = (tenant, job_id)
        with self._lock:
            record = self._jobs.get(key)
        if record is None:
            return self._cancel_elsewhere(tenant, job_id)
        with self._lock:
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
            self._remove_partial(tenant, snapshot)
        return self._public(snapshot)

    def _cancel_elsewhere(self, tenant: str, job_id: str) -> dict[str, Any]:
        """Cancel a job this replica does not run: mark its record; its owner stops at its next
        heartbeat, or, when the owner is gone, the replica that takes it over finishes the cancel."""
        if not job_id.startswith("score_"):
            raise NotFoundError(f"no job {job_id!r}")

        def change(record: dict[str, Any]) -> bool:
            if record["state"] in FINISHED:
                return False
            record.update(state="cancelling", cancel_requested=True)
            return True

        record = self.records.update(tenant, job_id, change)
        if record is None:
            raise NotFoundError(f"no job {job_id!r}")
        if record["state"] in FINISHED:
            raise ConflictError(f"job {job_id!r} has already {record['state']}; there is nothing to cancel")
        with self._lock:
            return self._public(record)

    def close(self) -> None:
        """Stop between chunks; jobs still queued or running are resumed by another replica or at the
        next start (once :meth:`join` lets go of this owner)."""
        self._closing.set()
        for ev in self._cancel.values():
            ev.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float = 60.0) -> None:
        """Wait for the jobs' threads to stop (after :meth:`close`), then release this owner, so its
        unfinished jobs become orphans another replica resumes."""
        deadline = time.monotonic() + timeout
        for f in self._futures:
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # cancelled futures, or a run that already logged its failure
                pass
        self._sweeper.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._closing.is_set():
            self.records.close()

    # -- running ------------------------------------------------------------------------------------------
    def _run(self, tenant: str, job_id: str) -> None:
        key = (tenant, job_id)
        cancel = self._cancel[key]
        with self._lock:
            record = self._jobs.get(key)
            if record is None or record["state"] in FINISHED:
                return
            stop = cancel.is_set()
            if not stop:
                record.update(state="running", started=record["started"] or _now())
            snapshot = dict(record)
        if stop:  # cancelled (here or through another replica) before it started, or the service is stopping
            if snapshot["state"] == "cancelling":
                self._stopped(tenant, key)
            return
        self._save(tenant, snapshot)
        sp = snapshot["spec"]
        spec = JobSpec(SourceSpec(sp["source"], id_col=snapshot["id_col"], text_col=snapshot["text_col"],
                                  table=snapshot["table"]), Path(sp["out"]), tenant,
                       tuple(snapshot["classifiers"]), format=sp["format"], rejects=Path(sp["rejects"]),
                       namespace=snapshot["namespace"], chunk_rows=CHUNK_ROWS, root=self.folder(tenant))
        saved = [time.monotonic()]

        def on_commit(job: ScoreJob, _chunk) -> None:
            if time.monotonic() - saved[0] > SAVE_EVERY_S:
                saved[0] = time.monotonic()
                with self._lock:
                    record = self._jobs.get(key)
                    if record is None:
                        return
                    snap = self._public(record)
                self._save(tenant, {**record, **{k: snap[k] for k in ("progress", "counts")}})

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
        except LeaseLost:
            return
        except HeadfleetError as exc:
            if self._closing.is_set():
                return  # the scheduler went away under a chunk: resumed at the next start
            self._failed(tenant, key, {"error": self._for_tenant(tenant, exc.message), "error_type": exc.error_type})
            return
        except Exception as exc:  # a bug or the disk, not the request: say so, keep the service up
            if self._closing.is_set():
                return
            err = path_error(exc, "a file of the job") if isinstance(exc, OSError) else None
            if err is not None:  # the store changed under the job (a file removed, made unreadable...)
                self._failed(tenant, key, {"error": self._for_tenant(tenant, f"{err.message} ({exc.strerror}: "
                                                                             f"{exc.filename})"),
                                           "error_type": err.error_type})
                return
            log.exception("scoring job %s failed", job_id)
            self._failed(tenant, key, {"error": self._for_tenant(tenant, f"internal error ({type(exc).__name__}: "
                                                                         f"{exc})"),
                                       "error_type": "internal_error"})
            return
        self._finish(tenant, key, "succeeded", report={k: report[k] for k in REPORT_KEYS})

    def _failed(self, tenant: str, key: tuple[str, str], error: dict[str, str]) -> None:
        """A failed job is not resumed: its partial output goes, so the output path can be used again."""
        with self._lock:
            record = self._jobs.get(key)
        if record is None:
            return
        try:
            self._remove_partial(tenant, record)
        except (HeadfleetError, OSError):
            log.warning("could not remove the partial output of failed job %s", key[1])
        self._finish(tenant, key, "failed", error=error)

    def _remove_partial(self, tenant: str, record: dict[str, Any]) -> None:
        Workdir(Path(record["spec"]["out"]), "", self.confined(tenant)).remove()

    def _persist(self) -> None:
        local = getattr(self.engine, "local", None)
        if local is not None and local.dirty:
            local.save()

    def _classify(self, *args, **kwargs) -> dict:
        if self._closing.is_set():  # the scheduler is going away: leave the chunk for the next start
            raise Cancelled("the service is stopping")
        return self.classify(*args, **kwargs)

    def _stopped(self, tenant: str, key: tuple[str, str]) -> None:
        if self._closing.is_set() or key[1] in self._lost:
            return  # not the user's cancel: the record stays running and the job resumes elsewhere or at start
        with self._lock:
            record = self._jobs.get(key)
        if record is None:
            return
        self._remove_partial(tenant, record)
        self._finish(tenant, key, "cancelled")

    def _finish(self, tenant: str, key: tuple[str, str], state: str, **changes: Any) -> None:
        with self._lock:
            record = self._jobs.get(key)
            if record is None:  # taken over by another replica
                return
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
        out = {k: v for k, v in record.items() if k not in ("spec", "lease")}
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

    # -- records and leases ------------------------------------------------------------------------------
    def _save(self, tenant: str, record: dict[str, Any]) -> None:
        """Write a job this replica runs (with a fresh heartbeat); a cancel request another replica
        wrote into the record is kept and acted on. A job taken over by another replica is let go."""
        key = (tenant, record["id"])
        try:
            saved = self.records.renew(tenant, record, keep=("cancel_requested",))
        except LeaseLost:
            log.warning("scoring job %s was taken over by another replica; this one lets it go", record["id"])
            with self._lock:
                self._lost.add(record["id"])
                self._jobs.pop(key, None)
                ev = self._cancel.get(key)
            if ev is not None:
                ev.set()
            return
        if saved.get("cancel_requested") and saved["state"] in ("queued", "running"):
            with self._lock:
                live = self._jobs.get(key)
                if live is not None and live["state"] in ("queued", "running"):
                    live.update(state="cancelling", cancel_requested=True)
                ev = self._cancel.get(key)
            if ev is not None:
                ev.set()

    def _sweep_loop(self) -> None:
        while not self._closing.wait(self.sweep_s):
            try:
                self._sweep()
            except Exception:  # a full disk or a vanished folder: try again next time, keep serving
                log.exception("scoring jobs' lease sweep failed")

    def _sweep(self) -> None:
        """Renew this replica's unfinished jobs (with their progress), then take over orphans."""
        with self._lock:
            mine = [(key[0], {**r, **{k: v for k, v in self._public(r).items() if k in ("progress", "counts")}})
                    for key, r in self._jobs.items() if r["state"] in UNFINISHED]
        for tenant, record in mine:
            self._save(tenant, record)
        if self._closing.is_set():
            return
        for tenant, record in self.records.unfinished("score_"):
            if record.get("state") in UNFINISHED and (tenant, record["id"]) not in self._jobs \
                    and self.records.orphaned(record):
                self._take_over(tenant, record["id"])

    def _take_over(self, tenant: str, job_id: str) -> None:
        """Claim an orphaned job: a cancel in progress is finished; anything else resumes from its
        last committed chunk on this replica."""
        def change(record: dict[str, Any]) -> None:
            if record.get("state") == "cancelling":
                record.update(state="cancelled", finished=_now())
            else:
                record.update(state="queued", restarts=int(record.get("restarts") or 0) + 1)

        record = self.records.claim(tenant, job_id, change)
        if record is None:
            return
        key = (tenant, job_id)
        if record["state"] == "cancelled":
            try:
                self._remove_partial(tenant, record)
            except (HeadfleetError, OSError):
                log.warning("could not remove the partial output of cancelled job %s", job_id)
            return
        log.info("resuming scoring job %s of tenant %s", job_id, tenant)
        with self._lock:
            self._jobs[key] = record
            self._cancel[key] = threading.Event()
        self._futures.append(self._pool.submit(self._run, tenant, job_id))


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
