"""Training jobs: submitted by ``POST /classifiers``, run off the request path, polled by id.

A job's embeddings go through the scheduler in its own lane (``<tenant>#train``), so a
training run shares the backbone fairly with live traffic instead of racing it. Job records
are JSON files under ``<data_dir>/jobs/<tenant>/`` written atomically, each with its owner's
lease (``job_records``), so several replicas share one jobs folder:

- a job runs once: on the replica that took it (submitted it, or took it over);
- any replica answers ``GET /jobs/{id}``: its own jobs from memory, the others' from the record,
  which the owner rewrites with its progress at every heartbeat (``lease_s / 3``, 10 s by default);
- a replica that starts later never touches a job whose owner is alive; a job whose owner died
  (or stopped renewing for ``lease_s``) is taken over at the next sweep (every ``sweep_s``) by
  one replica: a ``POST /classifiers`` job runs again from its saved examples (``<id>.input``;
  training is deterministic given the seed), a monitor's retrain (``type`` ``retrain``, a
  closure that cannot be saved) is marked failed (``interrupted``), as every unfinished job was
  before owners existed. ``restarts`` counts the takeovers.
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

from headfleet.errors import HeadfleetError, NotFoundError, clip_message
from headfleet.heads import Examples
from headfleet.service.job_records import UNFINISHED, JobRecords, LeaseLost

log = logging.getLogger(__name__)

CHUNK = 256  # texts per scheduler submission: progress moves, the queue stays short
SWEEP_S = 2.0  # how often a replica renews its jobs' leases (at most) and looks for orphaned jobs


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _public(job: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /jobs/{id}`` shows: the record without its lease (owners name hosts)."""
    return json.loads(json.dumps({k: v for k, v in job.items() if k != "lease"}))


def _examples_doc(examples: Examples) -> dict[str, Any]:
    return {"texts": examples.texts, "labels": examples.labels, "multi_label": examples.multi_label,
            "source_hash": examples.source_hash, "label_spellings": examples.label_spellings}


class JobManager:
    """Training jobs of every tenant: submit, poll, list; owned and shared through ``JobRecords``.

    ``root``: the jobs folder; ``workers``: jobs trained at once; ``lease_s`` (seconds): how long an
    owner's heartbeat stays valid; ``sweep_s`` (seconds): how often leases are renewed and
    orphans looked for (at most ``lease_s / 3``)."""

    def __init__(self, engine, scheduler, root: Path, workers: int = 1, *, lease_s: float | None = None,
                 sweep_s: float = SWEEP_S):
        self.engine = engine
        self.scheduler = scheduler
        self.records = JobRecords(root) if lease_s is None else JobRecords(root, lease_s=lease_s)
        self.sweep_s = min(float(sweep_s), self.records.lease_s / 3)
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}  # the jobs this replica runs or ran
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="headfleet-train")
        # ``canary_hash(tenant, name) -> str | None``: the hash of the classifier's canary set, recorded
        # in the manifests of the versions jobs train; set by the service once its monitor exists
        self.canary_hash: Callable[[str, str], str | None] | None = None
        self._closing = threading.Event()
        self.records.hold()
        self._sweep()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="headfleet-train-leases", daemon=True)
        self._sweeper.start()

    # -- public ---------------------------------------------------------------------------------
    def submit(self, tenant: str, name: str, examples: Examples, *, kind: str, seed: int,
               candidate: bool = False) -> dict[str, Any]:
        job_id = "job_" + secrets.token_hex(8)
        job = {"id": job_id, "type": "train", "classifier": name, "kind": kind, "candidate": candidate, "state": "queued",
               "created": _now(), "started": None, "finished": None, "restarts": 0,
               "progress": {"embedded": 0, "total": len(examples.texts)}, "result": None, "error": None}
        # what another replica needs to run it again if this one dies first
        self.records.save_input(tenant, job_id, {"name": name, "kind": kind, "seed": seed, "candidate": candidate,
                                                 "examples": _examples_doc(examples)})
        with self._lock:
            self._jobs[(tenant, job_id)] = job
        self.records.create(tenant, job)
        self._pool.submit(self._run, tenant, job_id, name, examples, kind, seed, candidate)
        return _public(job)

    def submit_run(self, tenant: str, name: str, run: Callable[..., dict], total: int, *, kind: str = "retrain",
                   reason: str | None = None) -> dict[str, Any]:
        """A job that calls ``run(embed, progress)`` (``embed`` goes through the scheduler on the
        tenant's training lane) and records the manifest it returns; the monitor's retrains."""
        job_id = "job_" + secrets.token_hex(8)
        job = {"id": job_id, "type": kind, "classifier": name, "kind": kind, "state": "queued", "reason": reason,
               "created": _now(), "started": None, "finished": None, "restarts": 0,
               "progress": {"embedded": 0, "total": total}, "result": None, "error": None}
        with self._lock:
            self._jobs[(tenant, job_id)] = job
        self.records.create(tenant, job)
        self._pool.submit(self._execute, tenant, job_id, total,
                          lambda progress: run(self._embed, progress))
        return _public(job)

    def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        """The job as this replica knows it (its own) or as its owner last wrote it (another's).
        NotFoundError for another tenant's id and a made-up one alike."""
        with self._lock:
            job = self._jobs.get((tenant, job_id))
            if job is not None:
                return _public(job)
        job = self.records.read(tenant, job_id) if job_id.startswith("job_") else None
        if job is None:
            raise NotFoundError(f"no job {job_id!r}")
        return _public(job)

    def list(self, tenant: str) -> list[dict[str, Any]]:
        jobs = {j["id"]: j for _, j in self.records.load("job_", tenant)}
        with self._lock:
            jobs.update({i: j for (t, i), j in self._jobs.items() if t == tenant})
        return sorted((_public(j) for j in jobs.values()), key=lambda j: j["created"], reverse=True)

    def close(self) -> None:
        """Stop taking jobs; jobs in flight are abandoned and another replica (or the next start)
        takes them over."""
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sweeper.join(timeout=5)
        self.records.close()

    # -- leases ---------------------------------------------------------------------------------
    def _sweep_loop(self) -> None:
        while not self._closing.wait(self.sweep_s):
            try:
                self._sweep()
            except Exception:  # a full disk or a vanished folder: try again next time, keep serving
                log.exception("training jobs' lease sweep failed")

    def _sweep(self) -> None:
        """Renew this replica's unfinished jobs (with their progress), then take over orphans."""
        with self._lock:
            mine = [(t, dict(j)) for (t, _), j in self._jobs.items() if j["state"] in UNFINISHED]
        for tenant, job in mine:
            try:
                self.records.renew(tenant, job)
            except LeaseLost:
                log.warning("training job %s was taken over by another replica; this one lets it go", job["id"])
                with self._lock:
                    self._jobs.pop((tenant, job["id"]), None)
        if self._closing.is_set():
            return
        for tenant, job in self.records.unfinished("job_"):
            if job.get("state") in UNFINISHED and (tenant, job["id"]) not in self._jobs \
                    and self.records.orphaned(job):
                self._take_over(tenant, job["id"])

    def _take_over(self, tenant: str, job_id: str) -> None:
        spec = self.records.read_input(tenant, job_id)

        def change(job: dict[str, Any]) -> None:
            if spec is None:  # a retrain (a closure), or a job from before inputs were saved
                job.update(state="failed", finished=_now(),
                           error={"error": "the replica running this job stopped before it finished; submit it again",
                                  "error_type": "interrupted"})
            else:
                job.update(state="queued", restarts=int(job.get("restarts") or 0) + 1,
                           progress={"embedded": 0, "total": job.get("progress", {}).get("total", 0)})

        job = self.records.claim(tenant, job_id, change)
        if job is None or spec is None:
            return
        try:
            ex = spec["examples"]
            examples = Examples(ex["texts"], ex["labels"], ex["multi_label"], ex.get("source_hash", ""),
                                ex.get("label_spellings") or {})
        except (KeyError, TypeError, HeadfleetError) as exc:
            self._update(tenant, job_id, state="failed", finished=_now(),
                         error={"error": f"the job's saved input is unusable ({exc}); submit it again",
                                "error_type": "interrupted"})
            return
        with self._lock:
            self._jobs[(tenant, job_id)] = job
        self._pool.submit(self._run, tenant, job_id, spec["name"], examples, spec["kind"], spec["seed"],
                          bool(spec.get("candidate")))

    # -- running --------------------------------------------------------------------------------
    def _update(self, tenant: str, job_id: str, **changes: Any) -> None:
        with self._lock:
            job = self._jobs.get((tenant, job_id))
            if job is None:  # taken over by another replica
                return
            job.update(changes)
            snapshot = dict(job)
        try:
            self.records.renew(tenant, snapshot)
        except LeaseLost:
            with self._lock:
                self._jobs.pop((tenant, job_id), None)
            return
        if snapshot["state"] not in UNFINISHED:
            self.records.drop_input(tenant, job_id)

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
                job = self._jobs.get((tenant, job_id))
                if job is not None:
                    job["progress"] = {"embedded": min(done[0], total), "total": total}

        try:
            manifest = train(progress)
        except HeadfleetError as exc:
            self._update(tenant, job_id, state="failed", finished=_now(),
                         error={"error": exc.message, "error_type": exc.error_type})
            return
        except Exception as exc:  # a bug, not the user's data: say so, keep the service up
            log.exception("training job %s failed", job_id)
            self._update(tenant, job_id, state="failed", finished=_now(),
                         error={"error": clip_message(f"internal error ({type(exc).__name__}: {exc})"),
                                "error_type": "internal_error"})
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
