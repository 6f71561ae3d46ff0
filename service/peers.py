"""The processes that serve one data folder together, and what they share through it.

``headfleet serve --workers N`` runs N worker processes on one listening socket, and a Ray Serve
deployment runs N replicas; a request reaches one of them. Each process is a whole headfleet
(backbone, scheduler, heads, memory tier), and the registry, keys, jobs and lifecycle state
already live in the data folder or Redis. Two things did not: the cache-hit report (each process
counted its own requests) and a backbone reload (it reached the process that answered it). A
*group* is one ``serve`` run (or one Ray deployment); its members share them here:

``<data>/run/<group>/``

- ``<member>.lock``: an ``flock`` the member holds while it lives (the kernel drops it when the
  process dies, however it dies), so any member tells a live peer from a dead one;
- ``<member>.json``: the member's heartbeat, rewritten every ``interval_s`` (0.25 s): pid, host,
  start time, the backbone fingerprint it serves, the reload generation it has followed, its
  texts waiting per tenant;
- ``<member>/<tenant>.json``: that tenant's raw cache figures (``CacheStats.export``), rewritten
  within ``interval_s`` of a change. ``/stats`` adds every other member's file of the caller's
  tenant to its own figures, dead members included (what they counted happened in this run:
  nothing is lost when a worker is restarted), so the report is the group's, at most
  ``interval_s`` behind;
- ``reload.json``: ``{"generation", "by", "at"}``. ``POST /admin/backbone/reload`` reloads the
  member that answers it, then raises the generation; every other member's watcher reloads itself
  when it sees the new generation and says so in its heartbeat, and the answer waits for every
  live member (``Peers.spread_reload``).

Files are runtime state: written to a temp file and renamed (never torn), not fsynced. Groups
whose members are all gone and that nobody touched for ``STALE_GROUP_S`` are removed when a new
member starts. Tenants never read each other's files: ``/stats`` opens the caller's file only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("headfleet.peers")

INTERVAL_S = 0.25  # figures and heartbeat: what another member's report may lag, and a kill -9 may lose
STALE_GROUP_S = 600.0
RELOAD_WAIT_S = 300.0  # how long a reload's answer waits for the other members (a backbone load is 10-50 s)


def new_group() -> str:
    """A group id for one ``serve`` run: time-ordered, unique."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _held(lock: Path) -> bool:
    """Whether another process holds ``lock``'s flock (a live member holds it exclusively). The probe
    asks for a shared lock, so two probes at once never see each other as a live member."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the lock this probe took, if it took one
    return False


def _tenant_file(tenant: str) -> str:
    return urllib.parse.quote(tenant, safe="") + ".json"


class Peers:
    """One member of a serving group (see the module docstring).

    ``heartbeat()``: this member's state to publish (``fingerprint``, ``waiting``: tenant -> texts);
    ``figures(changed_only)``: tenant -> raw cache figures (``CacheStats.export``);
    ``on_reload(generation)``: called
    on the watcher thread when another member asks for a reload (schedule it, then call
    :meth:`followed`)."""

    def __init__(self, data_dir: Path | str, group: str, *, heartbeat: Callable[[], dict[str, Any]],
                 figures: Callable[[bool], dict[str, Any]],
                 on_reload: Callable[[int], None] | None = None, interval_s: float = INTERVAL_S):
        self.runs = Path(data_dir) / "run"
        self.root = self.runs / group
        self.group = group
        self.member = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.started = time.time()
        self._heartbeat, self._figures, self._on_reload = heartbeat, figures, on_reload
        self.interval_s = interval_s
        self.generation = 0  # the reload generation this member has followed
        self.reload_note: dict[str, Any] | None = None  # how its last followed reload went
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._unwritten: dict[str, Any] = {}  # figures a failed write left behind: written with the next

    # -- life --------------------------------------------------------------------------------------
    def start(self) -> "Peers":
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_groups()
        (self.root / self.member).mkdir(exist_ok=True)
        self._lock_fd = os.open(self.root / f"{self.member}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        current = _read(self.root / "reload.json")
        self.generation = int(current["generation"]) if current else 0  # a member starts on the recorded backbone
        self.flush(everything=True)
        self._thread = threading.Thread(target=self._run, name="headfleet-peers", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """A last flush (nothing counted is lost), then the lock goes: the member reads as gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):
            self.flush(stopped=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _run(self) -> None:
        seen_mtime = 0.0
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # the heartbeat must outlive a full disk; what was not written is kept
                log.exception("peer heartbeat failed")
            try:  # apart: a failed write must not stop this member from following a reload
                path = self.root / "reload.json"
                mtime = path.stat().st_mtime if path.exists() else 0.0
                if mtime != seen_mtime:
                    seen_mtime = mtime
                    asked = _read(path)
                    if asked and int(asked["generation"]) > self.generation and asked.get("by") != self.member \
                            and self._on_reload is not None:
                        self._on_reload(int(asked["generation"]))
            except Exception:
                log.exception("checking the group's reload request failed")

    def flush(self, *, everything: bool = False, stopped: bool = False) -> None:
        """Write the changed tenants' figures, then the heartbeat."""
        with self._write_lock:
            figures = {**self._unwritten, **self._figures(not everything)}  # newer figures win
            self._unwritten = {}
            folder = self.root / self.member
            for i, (tenant, raw) in enumerate(figures.items()):
                try:
                    _replace(folder / _tenant_file(tenant), json.dumps(raw, separators=(",", ":")).encode())
                except OSError:
                    self._unwritten = dict(list(figures.items())[i:])  # tried again at the next flush
                    raise
            beat = {"member": self.member, "pid": os.getpid(), "host": socket.gethostname(),
                    "started": self.started, "at": time.time(), "generation": self.generation,
                    "reload": self.reload_note, "stopped": stopped, **self._heartbeat()}
            _replace(self.root / f"{self.member}.json", json.dumps(beat, separators=(",", ":")).encode())

    def _remove_stale_groups(self) -> None:
        now = time.time()
        for group in self.runs.iterdir() if self.runs.is_dir() else ():
            if group == self.root or not group.is_dir():
                continue
            try:
                if now - max((p.stat().st_mtime for p in group.iterdir()), default=group.stat().st_mtime) \
                        < STALE_GROUP_S or any(_held(lock) for lock in group.glob("*.lock")):
                    continue
                shutil.rmtree(group, ignore_errors=True)
            except OSError:
                continue

    # -- reading the others ------------------------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        """Every other member's last heartbeat, with ``live`` (its lock is held)."""
        out = []
        for beat_file in self.root.glob("*.json"):
            name = beat_file.stem
            if name in (self.member, "reload"):
                continue
            beat = _read(beat_file)
            if beat is None:
                continue
            beat["live"] = _held(self.root / f"{name}.lock")
            out.append(beat)
        return out

    def figures_of(self, tenant: str) -> list[dict[str, Any]]:
        """Every other member's raw figures for ``tenant`` (live or not)."""
        out = []
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name != self.member:
                raw = _read(folder / _tenant_file(tenant))
                if raw is not None:
                    out.append(raw)
        return out

    def tenants(self) -> set[str]:
        """Tenants any other member has figures for (the operator's views only)."""
        out = set()
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name != self.member:
                out.update(urllib.parse.unquote(f.name[:-5]) for f in folder.glob("*.json"))
        return out

    # -- reload ----------------------------------------------------------------------------------
    def followed(self, generation: int, note: dict[str, Any]) -> None:
        """This member has followed reload ``generation`` (``note``: its outcome); published now."""
        self.generation = max(self.generation, generation)
        self.reload_note = note
        try:
            self.flush()
        except OSError:
            log.exception("could not publish the followed reload; the next heartbeat tries again")

    def _ask_reload(self) -> int:
        """A new generation in ``reload.json``, under the group's flock (two members asking at once
        get two generations); returns it."""
        from headfleet.atomic import locked

        with locked(self.root / "reload.lock"):
            current = _read(self.root / "reload.json")
            generation = max(self.generation, int(current["generation"]) if current else 0) + 1
            _replace(self.root / "reload.json",
                     json.dumps({"generation": generation, "by": self.member, "at": time.time()}).encode())
        self.generation = generation
        self.flush()
        return generation

    async def spread_reload(self, fingerprint: str, *, timeout_s: float = RELOAD_WAIT_S) -> dict[str, Any]:
        """Ask every other live member to reload (a new generation in ``reload.json``) unless each
        already serves ``fingerprint``, and wait until each has followed or ``timeout_s`` passed.
        Returns ``{"members", "followed", "pending", "failed"}`` (member ids; ``failed``: id -> reason);
        ``{"error"}`` beside them when the request could not be written (this member has reloaded)."""
        live = [m for m in await asyncio.to_thread(self.members) if m["live"]]
        if all(m.get("fingerprint") == fingerprint for m in live):
            return {"members": len(live) + 1, "followed": [], "pending": [], "failed": {}}
        try:
            generation = await asyncio.to_thread(self._ask_reload)
        except OSError as exc:
            log.exception("could not ask the group to reload")
            return {"members": len(live) + 1, "followed": [], "pending": sorted(m["member"] for m in live),
                    "failed": {}, "error": f"the other workers were not asked to reload: {exc}"}
        deadline = time.monotonic() + timeout_s
        while True:
            beats = {m["member"]: m for m in await asyncio.to_thread(self.members) if m["live"]}
            waiting = [k for k, m in beats.items() if int(m.get("generation", 0)) < generation]
            if not waiting or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        failed = {k: note["error"] for k, m in beats.items() if k not in waiting and (note := m.get("reload") or {})
                  .get("error") and int(note.get("generation", 0)) >= generation}
        return {"members": len(beats) + 1, "followed": sorted(k for k in beats if k not in waiting and k not in failed),
                "pending": sorted(waiting), "failed": failed}


# -- the group's reports -------------------------------------------------------------------------------
async def read_group(peers: Peers | None, tenant: str) -> tuple[float, list, list] | None:
    """The other members' part of ``tenant``'s report, read off the event loop: (this member's
    start, their raw figures of ``tenant``, their heartbeats); None outside a group."""
    if peers is None:
        return None
    figures, beats = await asyncio.to_thread(lambda: (peers.figures_of(tenant), peers.members()))
    return peers.started, figures, beats


def stats_report(service, tenant: str, group: tuple[float, list, list] | None) -> dict[str, Any]:
    """What ``GET /stats`` answers for ``tenant``: ``{"tenant", "uptime_s", "processes",
    "since_start", "windows": {"1m", "5m", "1h"}, "held", "queue"}``, the group's figures with
    ``group`` (:func:`read_group`). Only this tenant's figures are read, here and in the other
    members' files. Runs on the event loop (it reads the scheduler and the memory tier)."""
    engine = service.engine
    started, waiting, others, members = service.started, service.scheduler.waiting_for(tenant), [], 1
    if group is not None:
        mine, others, beats = group
        members += len(beats)
        started = min([mine, *(b.get("started", mine) for b in beats)])
        waiting += sum(int((b.get("waiting") or {}).get(tenant, 0)) for b in beats if b["live"])
    snap = engine.tenant_stats(tenant, others)
    windows = snap.pop("windows")
    return {"tenant": tenant, "uptime_s": round(time.time() - started, 1), "processes": members,
            "since_start": snap, "windows": windows, "held": engine.cache.held(engine.namespace_for(tenant, None)),
            "queue": {"texts_waiting": waiting}}


async def every_tenant(service, peers: Peers | None) -> dict[str, dict[str, Any]]:
    """Tenant -> its cache figures (``CacheStats.snapshot``), the group's when ``peers`` is given:
    the operator's view (``GET /admin/stats``, the dashboard's fleet page)."""
    e = service.engine
    if peers is None:
        return {t: e.tenant_stats(t) for t in e.stats.tenants()}

    def read() -> dict[str, list]:
        return {t: peers.figures_of(t) for t in set(e.stats.tenants()) | peers.tenants()}

    figures = await asyncio.to_thread(read)
    return {t: e.tenant_stats(t, figures[t]) for t in sorted(figures)}
