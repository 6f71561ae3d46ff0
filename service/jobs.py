"""Training jobs: submitted by ``POST /classifiers``, run off the request path, polled by id.

A job's embeddings go through the scheduler in its own lane (``<tenant>#train``), so a
training run shares the backbone fairly with live traffic instead of racing it. Job records
are JSON files under ``<data_dir>/jobs/<tenant>/`` written atomically; a job that was queued
or running when the process stopped is marked failed at the next start, saying so.
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

from headfleet.errors import HeadfleetError, NotFoundError
from headfleet.heads import Examples
from headfleet.service.job_records import JobRecords

log = logging.getLogger(__name__)

CHUNK = 256  # texts per scheduler submission: progress moves, the queue stays short


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobManager:
    def __init__(self, engine, scheduler, root: Path, workers: int = 1):
        self.engine = engine
        self.scheduler = scheduler
        self.records = JobRecords(root)
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="headfleet-train")
        # ``canary_hash(tenant, name) -> str | None``: the hash of the classifier's canary set, recorded
        # in the manifests of the versions jobs train; set by the service once its monitor exists
        self.canary_hash: Callable[[str, str], str | None] | None = None
        self._recover()

    # -- public ---------------------------------------------------------------------------------
    def submit(self, tenant: str, name: str, examples: Examples, *, kind: str, seed: int,
               candidate: bool = False) -> dict[str, Any]:
        job_id = "job_" + secrets.token_hex(8)
        job = {"id": job_id, "type": "train", "classifier": name, "kind": kind, "candidate": candidate, "state": "queued",
               "created": _now(), "started": None, "finished": None,
               "progress": {"embedded": 0, "total": len(examples.texts)}, "result": None, "error": None}
        with self._lock:
            self._jobs[(tenant, job_id)] = job
        self._save(tenant, job)
        self._pool.submit(self._run, tenant, job_id, name, examples, kind, seed, candidate)
        return dict(job)

    def submit_run(self, tenant: str, name: str, run: Callable[..., dict], total: int, *, kind: str = "retrain",
                   reason: str | None = None) -> dict[str, Any]:
        """A job that calls ``run(embed, progress)`` (``embed`` goes through the scheduler on the
        tenant's training lane) and records the manifest it returns; the monitor's retrains."""
        job_id = "job_" + secrets.token_hex(8)
        job = {"id": job_id, "type": kind, "classifier": name, "kind": kind, "state": "queued", "reason": reason,
               "created": _now(), "started": None, "finished": None,
               "progress": {"embedded": 0, "total": total}, "result": None, "error": None}
        with self._lock:
            self._jobs[(tenant, job_id)] = job
        self._save(tenant, job)
        self._pool.submit(self._execute, tenant, job_id, total,
                          lambda progress: run(self._embed, progress))
        return dict(job)

    def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get((tenant, job_id))
            if job is None:  # another tenant's job id gets the same answer as a made-up one
                raise NotFoundError(f"no job {job_id!r}")
            return json.loads(json.dumps(job))

    def list(self, tenant: str) -> list[dict[str, Any]]:
        with self._lock:
            jobs = [dict(j) for (t, _), j in self._jobs.items() if t == tenant]
        return sorted(jobs, key=lambda j: j["created"], reverse=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- running --------------------------------------------------------------------------------
    def _update(self, tenant: str, job_id: str, **changes: Any) -> None:
        with self._lock:
            job = self._jobs[(tenant, job_id)]
            job.update(changes)
            snapshot = dict(job)
        self._save(tenant, snapshot)

    def _run(self, tenant: str, job_id: str, name: str, examples: Examples, kind: str, seed: int,
             candidate: bool = False) -> None:
        def train(progress: Callable[[int], None]) -> dict:
            provenance = None if self.canary_hash is None else {"canary_hash": self.canary_hash(tenant, name)}
            return self.engine.train(tenant, name, examples, kind=kind, seed=seed, progress=progress, embed=self._embed,
                                     candidate=candidate, provenance=provenance)

        self._execute(tenant, job_id, len(examples.texts), train)

    def _execute(self, tenant: str, job_id: str, total: int, train: Callable[[Callable[[int], None]], dict]) -> None:
        """Run ``train(progress) -> manifest`` as the job: state, progress, result or error."""
        self._update(tenant, job_id, state="running", started=_now())
        done = [0]

        def progress(n: int) -> None:
            done[0] += n
            with self._lock:
                self._jobs[(tenant, job_id)]["progress"] = {"embedded": min(done[0], total), "total": total}

        try:
            manifest = train(progress)
        except HeadfleetError as exc:
            self._update(tenant, job_id, state="failed", finished=_now(),
                         error={"error": exc.message, "error_type": exc.error_type})
            return
        except Exception as exc:  # a bug, not the user's data: say so, keep the service up
            log.exception("training job %s failed", job_id)
            self._update(tenant, job_id, state="failed", finished=_now(),
                         error={"error": f"internal error ({type(exc).__name__}: {exc})", "error_type": "internal_error"})
            return
        result = {"id": manifest["id"], "version": manifest["version"], "metrics": manifest.get("metrics"),
                  "warnings": manifest.get("validation", {}).get("warnings", []),
                  "training_cache": manifest.get("training_cache")}
        if "retrain" in manifest:  # a monitor's candidate: why it was made and how it compares
            result["candidate"] = True
            result["retrain"] = manifest["retrain"]
        self._update(tenant, job_id, state="succeeded", finished=_now(), result=result,
                     progress={"embedded": total, "total": total})

    def _embed(self, tenant: str, texts: list[str], progress=None):
        """``Engine.embed`` with the scheduler as the compute step, in the tenant's training lane (so
        training shares the backbone fairly with live traffic), a chunk of misses at a time."""
        return self.engine.embed(tenant, texts, compute=self.compute(tenant, f"{tenant}#train"), progress=progress)

    def compute(self, tenant: str, lane: str):
        """A ``Compute`` (see ``headfleet.engine.types``) that embeds misses through the scheduler on
        ``lane``, a chunk at a time; call it from a worker thread, never the event loop."""

        def compute(keys, todo, spaces, progress_):
            t0 = time.perf_counter()
            answers: dict = {}
            for i in range(0, len(keys), CHUNK):
                part = slice(i, i + CHUNK)
                answers.update(self.scheduler.run_from_thread(tenant, keys[part], todo[part], spaces[part],
                                                              lane=lane))
                if progress_ is not None:
                    progress_(len(keys[part]))
            return answers, {"embed": (time.perf_counter() - t0) * 1e3}

        return compute

    # -- records --------------------------------------------------------------------------------
    def _save(self, tenant: str, job: dict[str, Any]) -> None:
        self.records.save(tenant, job)

    def _recover(self) -> None:
        for tenant, job in self.records.load("job_"):
            if job.get("state") in ("queued", "running"):
                job.update(state="failed", finished=_now(),
                           error={"error": "the service restarted before this job finished; submit it again",
                                  "error_type": "interrupted"})
                self._save(tenant, job)
            self._jobs[(tenant, job["id"])] = job
