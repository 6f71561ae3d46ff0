"""Job records on disk, one store for training and scoring jobs, shared by every replica on the folder.

Layout: ``<data dir>/jobs/<tenant>/<job id>.json``, each replaced atomically (temp file, fsync,
rename), so a crash leaves the previous record or the new one. A tenant's records live under its
own folder only; an unreadable record is skipped with a warning, never fatal at start.
``<job id>.input`` beside a record holds what a job needs to run again elsewhere (a training
job's examples), removed when the job finishes.

**Owners and leases** (several replicas on one folder: ``headfleet serve --ray``, or two
``headfleet serve`` on one data folder). Every process is an *owner* (``owner``: host, pid and
a random part) and holds an ``flock`` on ``.owners/<owner>`` for as long as it lives. A queued or
running job's record carries ``lease = {"owner", "heartbeat", "lease_s"}``; the owner renews the
heartbeat every ``lease_s / 3`` seconds while the job is its own. A job is **orphaned**, and any
owner may take it over, only when

- its record has no lease (written by a version before leases, or by a process that never ran it), or
- its owner is gone: the owner's lock file can be locked (the kernel released the dead process's
  ``flock``), or
- its heartbeat is older than ``lease_s`` (the owner lives but stopped renewing, or its machine
  is unreachable and the shared folder's locks cannot tell).

So a replica that starts later never takes a job whose owner is alive and renewing; it takes
over a dead owner's job within one sweep (``JobManager``/``ScoringJobs`` sweep every
``sweep_s``). Claims and renewals are read-modify-writes under an ``flock`` on
``<tenant>/.<job id>.lock``, so two replicas cannot both claim a job, and an owner whose lease
was taken away finds out at its next renewal (``LeaseLost``) and stops writing the record.
Lock files ``<tenant>/.<job id>.lock`` stay (unlinking a lock file another process holds would
let a third lock a fresh inode); a dead owner's ``.owners/<owner>`` file is removed by whoever finds it dead.
``flock`` is kernel-local on one machine and goes through the NFS lock manager across machines
(NFSv4: a dead machine's locks are reclaimed after the server's lease, 90 s by default).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from headfleet.atomic import write_json_atomic
from headfleet.errors import HeadfleetError
from headfleet.names import check_name

log = logging.getLogger(__name__)

#: Seconds a heartbeat stays valid; the owner renews every third of it.
LEASE_S = 30.0
UNFINISHED = ("queued", "running", "cancelling")
OWNERS_DIR = ".owners"


class LeaseLost(HeadfleetError):
    """Another owner took this job over (this one stopped renewing for longer than the lease)."""

    error_type = "interrupted"


def new_owner() -> str:
    """A name for this process as a job owner: ``<host>-<pid>-<6 hex>``."""
    host = re.sub(r"[^a-z0-9_.-]", "-", socket.gethostname().lower())[:40].strip("-.") or "host"
    return f"{host}-{os.getpid()}-{os.urandom(3).hex()}"


class JobRecords:
    """``save``, ``read``, ``load`` over the jobs folder, and job ownership (see the module docstring).

    ``owner``: this process's owner name (default :func:`new_owner`); ``lease_s``: how long a
    heartbeat is valid (seconds). The owner's lock file is taken at construction and released
    by :meth:`close` (or by the kernel when the process dies).
    """

    def __init__(self, root: Path, *, owner: str | None = None, lease_s: float = LEASE_S):
        self.root = Path(root)
        self.owner = owner or new_owner()
        self.lease_s = float(lease_s)
        self._alive: int | None = None  # fd holding the flock on .owners/<owner>
        self._alive_lock = threading.Lock()
        self._finished: set[Path] = set()  # records seen finished: never unfinished again, not re-read

    # -- plain records --------------------------------------------------------------------------
    def _folder(self, tenant: str) -> Path:
        return self.root / check_name(tenant, "tenant")

    def save(self, tenant: str, record: dict[str, Any]) -> None:
        folder = self._folder(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{record['id']}.json", record)

    def read(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        """The record of ``job_id`` in ``tenant``'s folder, or None (missing, unreadable, or an id
        that is not a name: never a path outside the folder)."""
        try:
            check_name(job_id, "job id")
            path = self._folder(tenant) / f"{job_id}.json"
        except HeadfleetError:
            return None
        return _read_json(path)

    def load(self, prefix: str, tenant: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every readable record whose id starts with ``prefix`` (``job_`` training, ``score_``
        scoring), as ``(tenant, record)``, tenants and ids in sorted order; ``tenant``: that
        tenant's only."""
        if not self.root.is_dir():
            return
        folders = [self.root / tenant] if tenant is not None else sorted(self.root.iterdir())
        for tdir in folders:
            try:
                name = check_name(tdir.name, "tenant")
            except HeadfleetError:
                continue
            if not tdir.is_dir():
                continue
            for path in sorted(tdir.glob(f"{prefix}*.json")):
                record = _read_json(path)
                if record is None:
                    log.warning("ignoring unreadable job record %s", path)
                elif "id" in record:
                    yield name, record

    def unfinished(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Like :meth:`load`, but only queued, running or cancelling records; a record once seen
        finished is not read again (a sweep over many old jobs lists their names and reads nothing)."""
        if not self.root.is_dir():
            return
        for tdir in sorted(self.root.iterdir()):
            try:
                tenant = check_name(tdir.name, "tenant")
            except HeadfleetError:
                continue
            if not tdir.is_dir():
                continue
            for path in sorted(tdir.glob(f"{prefix}*.json")):
                if path in self._finished:
                    continue
                record = _read_json(path)
                if record is None or "id" not in record:
                    continue
                if record.get("state") in UNFINISHED:
                    yield tenant, record
                else:
                    self._finished.add(path)

    # -- inputs ---------------------------------------------------------------------------------
    def save_input(self, tenant: str, job_id: str, doc: dict[str, Any]) -> None:
        folder = self._folder(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{job_id}.input", doc)

    def read_input(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        return _read_json(self._folder(tenant) / f"{job_id}.input")

    def drop_input(self, tenant: str, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._folder(tenant) / f"{job_id}.input").unlink()

    # -- ownership ------------------------------------------------------------------------------
    def _owner_file(self, owner: str) -> Path:
        return self.root / OWNERS_DIR / owner

    def hold(self) -> None:
        """Take this owner's lock file (idempotent): from now on, others see this owner alive."""
        with self._alive_lock:
            if self._alive is not None:
                return
            path = self._owner_file(self.owner)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._alive = fd

    def close(self) -> None:
        """Let go of this owner's lock file: its unfinished jobs become orphans others take over."""
        with self._alive_lock:
            if self._alive is None:
                return
            with contextlib.suppress(OSError):
                self._owner_file(self.owner).unlink()
            os.close(self._alive)
            self._alive = None

    def owner_alive(self, owner: str) -> bool:
        """Whether ``owner`` still holds its lock file (this process: while not closed)."""
        if owner == self.owner:
            return self._alive is not None
        if not isinstance(owner, str) or owner.startswith(".") or "/" in owner or not owner:
            return False
        path = self._owner_file(owner)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: the heartbeat decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (BlockingIOError), or a filesystem that cannot tell: the heartbeat decides
            os.close(fd)
            return True
        with contextlib.suppress(OSError):  # a dead owner's name is never taken again, so its file can go
            path.unlink()
        os.close(fd)
        return False

    def stamp(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with this owner's lease and a fresh heartbeat (epoch seconds)."""
        record["lease"] = {"owner": self.owner, "heartbeat": round(time.time(), 3), "lease_s": self.lease_s}
        return record

    def mine(self, record: dict[str, Any]) -> bool:
        lease = record.get("lease") or {}
        return lease.get("owner") == self.owner

    def orphaned(self, record: dict[str, Any]) -> bool:
        """An unfinished job nobody is running (see the module docstring for the rule)."""
        if record.get("state") not in UNFINISHED:
            return False
        lease = record.get("lease")
        if not isinstance(lease, dict) or not lease.get("owner"):
            return True
        if lease["owner"] == self.owner:
            return False
        try:
            expired = float(lease.get("heartbeat", 0)) + float(lease.get("lease_s", self.lease_s)) < time.time()
        except (TypeError, ValueError):
            expired = True
        return expired or not self.owner_alive(lease["owner"])

    @contextlib.contextmanager
    def locked(self, tenant: str, job_id: str) -> Iterator[None]:
        """An exclusive ``flock`` on ``<tenant>/.<job id>.lock`` for the with-block."""
        folder = self._folder(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f".{check_name(job_id, 'job id')}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def claim(self, tenant: str, job_id: str,
              change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Take over an orphaned job: under its lock, re-read the record and, if it is still
        orphaned, stamp this owner's lease on it (after ``change(record)``) and save it. Returns
        the saved record, or None when it is not (or no longer) an orphan."""
        self.hold()
        with self.locked(tenant, job_id):
            record = self.read(tenant, job_id)
            if record is None or not self.orphaned(record):
                return None
            previous = (record.get("lease") or {}).get("owner")
            if change is not None:
                change(record)
            self.stamp(record)
            self.save(tenant, record)
        log.info("job %s of tenant %s taken over from %s", job_id, tenant, previous or "no owner")
        return record

    def create(self, tenant: str, record: dict[str, Any]) -> None:
        """Save a new job's record with this owner's lease."""
        self.hold()
        self.save(tenant, self.stamp(record))

    def renew(self, tenant: str, record: dict[str, Any], *, keep: tuple[str, ...] = ()) -> dict[str, Any]:
        """Write the owner's ``record`` (with a fresh heartbeat) under the job's lock. Fields named in
        ``keep`` are taken from the record on disk when set there (what other replicas may write:
        a cancel request). Returns what was saved. Raises :class:`LeaseLost` when another owner holds
        the job now; the caller stops running it."""
        with self.locked(tenant, record["id"]):
            current = self.read(tenant, record["id"])
            if current is not None and not self.mine(current) and current.get("lease"):
                raise LeaseLost(f"job {record['id']} was taken over by {current['lease'].get('owner')}")
            out = dict(record)
            for name in keep:
                if current is not None and current.get(name) is not None:
                    out[name] = current[name]
            if out.get("state") in UNFINISHED:
                self.stamp(out)
            self.save(tenant, out)
        return out

    def update(self, tenant: str, job_id: str, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """Read-modify-write a record under its lock, whoever owns it: ``change(record)`` edits it in
        place and returns whether to save. Returns the record (None: no such job)."""
        with self.locked(tenant, job_id):
            record = self.read(tenant, job_id)
            if record is not None and change(record):
                self.save(tenant, record)
        return record


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
