"""The backbone gate over HTTP, for the admin: a plan as a job, and a reload of the data folder's backbone.

**Plan job** (``POST /admin/backbone/plan``): runs ``headfleet backbone plan`` as a child process of
the service, with the service's settings (data folder, Redis, backbone) in its environment. A child
process, not a thread: the two backbones it loads, its forwards and its memory stay out of the
serving process, and a cancel is a signal. Its state is one record, ``<data>/backbone-plan.job.json``
(written atomically); progress comes from the file the child rewrites after each classifier
(``--progress-file``). One plan runs at a time per data folder. A plan the service stopped (a
restart, ``DELETE``) is ``interrupted``/``cancelled``: the same request again resumes it from its
``.partial.jsonl`` without recomputing what was done.

**Reload** (``POST /admin/backbone/reload``): loads the backbone the data folder records
(``headfleet backbone apply`` / ``rollback``; the environment's when none) beside the one serving,
then swaps the whole :class:`Service` in place — the effect of a restart without refusing a request:
new requests wait at :func:`reload_gate` while requests in flight finish on the old service, the old
service stops (monitor, experiments and shadows flush their state; scoring jobs pause between chunks),
and the new one starts on the loaded backbone, where the backbone's own aliases
(``backbone_aliases.json``) point ``latest`` at the refit versions. The alias moves therefore take
effect in the same instant as the backbone. Refused (409) while a training job runs (it would be
interrupted). Process-local figures (``/stats`` windows, Prometheus counters) restart from zero, as
after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from headfleet.atomic import write_json_atomic
from headfleet.errors import BackendError, ConflictError, NotFoundError
from headfleet.settings import Settings

log = logging.getLogger(__name__)

RELOAD_WAIT_S = 60.0  # how long a request waits at the gate during a reload before a 503
DRAIN_S = 30.0  # how long a reload waits for requests in flight before giving up (409)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def child_env(settings: Settings) -> dict[str, str]:
    """The ``HEADFLEET_*`` environment that makes a child CLI open the same data folder, Redis and
    backbone as ``settings`` (the service may have been built from overrides, not the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADFLEET_")}
    values = {"DATA_DIR": settings.data_dir, "MODEL": settings.model_path, "BACKEND": settings.backend,
              "PRECISION": settings.precision, "DEVICE": settings.device, "MAX_LENGTH": settings.max_length,
              "BATCH_SIZE": settings.batch_size, "THREADS": settings.threads, "REDIS_URL": settings.redis_url,
              "REDIS_PREFIX": settings.redis_prefix, "REDIS_TTL_S": settings.redis_ttl_s or 0,
              "FAISS_STORE": "1" if settings.faiss_store else "0"}
    env.update({f"HEADFLEET_{k}": str(v) for k, v in values.items() if v is not None})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class PlanJob:
    """The data folder's one backbone plan job: start, read, cancel; see the module docstring.

    Files (``<data>/``): ``backbone-plan.json`` (the plan, as the CLI writes it), ``.partial.jsonl``
    and ``.staged/`` beside it, ``backbone-plan.job.json`` (this record), ``backbone-plan.progress.json``
    (``{"done", "total"}`` from the child), ``backbone-plan.log`` (the child's stderr)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        root = settings.layout.root
        self.plan_path = root / "backbone-plan.json"
        self.record_path = root / "backbone-plan.job.json"
        self.progress_path = root / "backbone-plan.progress.json"
        self.log_path = root / "backbone-plan.log"
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._watch: threading.Thread | None = None
        record = self._read()
        if record is not None and record["state"] == "running":  # a previous process's child: stopped with it
            record.update(state="interrupted", finished=_now(),
                          error={"error": "the service stopped while this plan ran; POST the same request "
                                          "again to resume it", "error_type": "interrupted"})
            write_json_atomic(self.record_path, record)

    # -- the record ----------------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # damaged (the write is atomic, so only by hand): as if none
            log.warning("%s is not JSON; ignoring it", self.record_path)
            return None

    def _update(self, **changes: Any) -> dict[str, Any]:
        with self._lock:
            record = self._read() or {}
            record.update(changes)
            write_json_atomic(self.record_path, record)
            return record

    # -- start ---------------------------------------------------------------------------------
    def start(self, request: dict[str, Any], registry) -> dict[str, Any]:
        """Start a plan; ``request`` as :class:`~headfleet.service.api.admin.PlanRequest` (validated
        there), ``registry`` the serving one. ConflictError while one runs; NotFoundError for a
        candidate folder that is not one, or when the tenant(s) have no classifier to compare (two
        backbones are not loaded for nothing)."""
        to = request.get("to")
        if to is not None and not _is_model_folder(to):
            raise NotFoundError(f"'to' must be a model folder on the server (with a config.json); {to!r} is not one")
        tenants = registry.tenants() if request.get("all_tenants") else [request["tenant"]]
        if not any(registry.list(t) for t in tenants):
            who = "no tenant has" if request.get("all_tenants") else f"tenant {request['tenant']!r} has"
            raise NotFoundError(f"{who} no classifier: there is nothing to plan (tenant)")
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                raise ConflictError("a backbone plan is already running: GET /admin/backbone/plan for its progress, "
                                    "DELETE /admin/backbone/plan to cancel it")
            argv = [sys.executable, "-m", "headfleet.service.cli", "backbone", "plan", "--json",
                    "--out", str(self.plan_path), "--progress-file", str(self.progress_path),
                    "--max-drop", str(request["max_drop"]),
                    "--max-negative-flips", str(request["max_negative_flips"])]
            for flag in ("to", "backend", "precision"):
                if request.get(flag) is not None:
                    argv += [f"--{flag}", str(request[flag])]
            argv += ["--all-tenants"] if request.get("all_tenants") else ["--tenant", request["tenant"]]
            self.progress_path.unlink(missing_ok=True)
            job_id = "plan_" + secrets.token_hex(6)
            record = {"id": job_id, "state": "running", "request": request, "started": _now(),
                      "started_ts": time.time(), "finished": None, "plan": str(self.plan_path), "error": None}
            write_json_atomic(self.record_path, record)
            with open(self.log_path, "wb") as err:
                self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                              env=child_env(self.settings), start_new_session=True)
            proc = self._proc
        self._watch = threading.Thread(target=self._wait, args=(proc, job_id), name="backbone-plan", daemon=True)
        self._watch.start()
        return self.get()

    def _wait(self, proc: subprocess.Popen, job_id: str) -> None:
        proc.wait()
        record = self._read() or {}
        if record.get("id") != job_id or record.get("state") != "running":
            return  # cancelled meanwhile: the record says so already
        if proc.returncode == 0:
            self._update(state="done", finished=_now())
            return
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        reason = next((line for line in reversed(tail) if line.startswith("error (")), None)
        self._update(state="failed", finished=_now(), error={
            "error": reason or f"the plan process exited with status {proc.returncode}: {' / '.join(tail)[-500:]}",
            "error_type": "plan_failed"})

    # -- read ----------------------------------------------------------------------------------
    def get(self) -> dict[str, Any]:
        """The record with ``progress`` (``done``, ``total``, ``fraction``, ``eta_s``) and, once done,
        ``report``: both backbones, the thresholds, the summary (counts, worst ten), every classifier
        whose verdict is not ``pass``, and the command that applies it. NotFoundError when no plan
        was ever started here."""
        record = self._read()
        if record is None:
            raise NotFoundError("no backbone plan has been started in this data folder: POST /admin/backbone/plan")
        try:
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            progress = {"done": 0, "total": None}
        done, total = progress.get("done", 0), progress.get("total")
        fraction = (done / total if total else (1.0 if record["state"] == "done" else 0.0))
        eta = None
        if record["state"] == "running" and total and 0 < done < total:
            elapsed = time.time() - record["started_ts"]
            eta = round(elapsed / done * (total - done), 1)
        record["progress"] = {"done": done, "total": total, "fraction": round(fraction, 4), "eta_s": eta}
        if record["state"] == "done":
            doc = self.report()
            record["report"] = {
                "from": doc["from"], "to": doc["to"], "thresholds": doc["thresholds"], "tenants": doc["tenants"],
                "seconds": doc["seconds"], "summary": doc["summary"],
                "attention": [r for r in doc["classifiers"] if r["verdict"] != "pass"],
                "apply": f"headfleet backbone apply {self.plan_path}"}
        return record

    def report(self) -> dict[str, Any]:
        """The whole plan file (every classifier's figures); NotFoundError before a plan finished."""
        try:
            return json.loads(self.plan_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFoundError("no finished backbone plan in this data folder yet") from None

    # -- cancel / close ------------------------------------------------------------------------
    def cancel(self) -> dict[str, Any]:
        """Stop the running plan (its finished classifiers stay in ``.partial.jsonl``: the same request
        resumes). ConflictError when none is running."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise ConflictError("no backbone plan is running")
        self._stop(proc, "cancelled", "cancelled by DELETE /admin/backbone/plan; POST the same request to resume")
        return self.get()

    def close(self) -> None:
        """At service stop: the child stops too and the record says ``interrupted``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._stop(proc, "interrupted", "the service stopped while this plan ran; POST the same request again "
                                             "to resume it")

    def _stop(self, proc: subprocess.Popen, state: str, why: str) -> None:
        self._update(state=state, finished=_now(), error={"error": why, "error_type": state})
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except (ProcessLookupError, PermissionError):  # it ended meanwhile
            pass
        if self._watch is not None:
            self._watch.join(10)


def _is_model_folder(path: str) -> bool:
    try:
        return (Path(path) / "config.json").is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


# -- reload ----------------------------------------------------------------------------------------
class Reloader:
    """Swaps ``app.state.service`` for one on the data folder's recorded backbone; see the module
    docstring. ``inflight`` counts HTTP requests (kept by :func:`reload_gate`)."""

    def __init__(self):
        self.inflight = 0
        self.open = asyncio.Event()
        self.open.set()
        self.running = False
        self.closing = False  # the app is stopping: no reload starts, none swaps
        self.last: dict[str, Any] | None = None

    async def reload(self, app, *, load_embedder=None, in_request: bool = True) -> dict[str, Any]:
        """``in_request``: called from a request (which the drain does not wait for), or by the group's
        watcher following another member's reload (``service.peers``). Returns ``{"reloaded", "from", "to", "paused_ms", "drained"}`` (``reloaded`` false when the
        recorded backbone is the one serving). ConflictError: another reload, a training job running, or
        requests still in flight after ``DRAIN_S``; BackendError: the new backbone failed to start (the
        old one is serving again)."""
        from headfleet.embedder import Embedder
        from headfleet.service.state import Service

        if self.closing:
            raise ConflictError("the service is stopping")
        if self.running:
            raise ConflictError("a backbone reload is already running")
        self.running = True
        try:
            old = app.state.service
            environment = Settings.from_env(data_dir=old.settings.data_dir)  # its backbone, after a rollback to it
            target = old.settings.with_recorded_backbone(otherwise=environment)
            before = _describe(old)
            if (target.model_path, target.backend, target.precision) == \
                    (old.settings.model_path, old.settings.backend, old.settings.precision):
                return {"reloaded": False, "from": before, "to": before, "paused_ms": 0.0,
                        "reason": "the data folder records the backbone that is serving"}
            _refuse_if_training(old)
            load = load_embedder or (lambda s: Embedder.load(
                s.model_path, max_length=s.max_length, batch_size=s.batch_size, device=s.device, threads=s.threads,
                backend=s.backend, precision=s.precision, cache_dir=s.layout.onnx))
            embedder = await asyncio.to_thread(load, target)  # the slow part, while the old one serves
            if embedder.fingerprint == old.engine.embedder.fingerprint:
                return {"reloaded": False, "from": before, "to": before, "paused_ms": 0.0,
                        "reason": "the recorded backbone has the serving backbone's fingerprint"}
            if self.closing:
                raise ConflictError("the service is stopping; the backbone was not swapped")
            t0 = time.perf_counter()
            self.open.clear()
            try:
                deadline = time.monotonic() + DRAIN_S
                mine = 1 if in_request else 0  # the reload's own request is one of them
                while self.inflight > mine:
                    if time.monotonic() > deadline:
                        raise ConflictError(f"{self.inflight - mine} request(s) still in flight after {DRAIN_S:.0f} s; "
                                            "nothing was changed, try the reload again")
                    await asyncio.sleep(0.005)
                _refuse_if_training(old)
                await old.stop()
                try:
                    new = await Service.start(target, embedder, old.engine.stats)  # /stats carries on
                except Exception as exc:
                    log.exception("the reloaded backbone failed to start; restarting the previous one")
                    app.state.service = await Service.start(old.settings, old.engine.embedder, old.engine.stats)
                    raise BackendError(f"the recorded backbone failed to start ({exc}); the previous backbone "
                                       "is serving again") from exc
                new.started = old.started  # /stats' uptime_s, like its figures, carries on
                app.state.service = new
            finally:
                self.open.set()
            paused = round((time.perf_counter() - t0) * 1e3, 1)
            self.last = {"reloaded": True, "from": before, "to": _describe(new), "paused_ms": paused, "at": _now()}
            log.info("backbone reloaded: %s -> %s in a %.0f ms pause", before["fingerprint"][:12],
                     self.last["to"]["fingerprint"][:12], paused)
            return self.last
        finally:
            self.running = False


def _describe(service) -> dict[str, Any]:
    e, s = service.engine.embedder, service.settings
    return {"model": str(e.folder), "backend": s.backend, "precision": s.precision, "fingerprint": e.fingerprint,
            "source": s.backbone_source}


def _refuse_if_training(service) -> None:
    folder = service.settings.layout.jobs  # one folder of job records per tenant that ever trained
    tenants = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    running = [j for t in tenants for j in service.jobs.list(t) if j.get("state") in ("queued", "running")]
    if running:
        raise ConflictError(f"{len(running)} training job(s) queued or running (e.g. {running[0]['id']}); a reload "
                            "would interrupt them: reload when they finish")


def reload_gate(app):
    """ASGI middleware: counts HTTP requests in flight and, while a reload swaps the service, holds new
    ones (up to ``RELOAD_WAIT_S``, then 503 ``backend_error``) so none reaches a stopped service."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        reloader: Reloader | None = getattr(scope["app"].state, "reloader", None) if "app" in scope else None
        if reloader is None:
            await app(scope, receive, send)
            return
        if not reloader.open.is_set():
            try:
                await asyncio.wait_for(reloader.open.wait(), RELOAD_WAIT_S)
            except asyncio.TimeoutError:
                body = json.dumps({"error": "the backbone is being reloaded; try again", "error_type": "backend_error"})
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        reloader.inflight += 1
        try:
            await app(scope, receive, send)
        finally:
            reloader.inflight -= 1

    return middleware
