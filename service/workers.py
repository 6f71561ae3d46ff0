"""``headfleet serve --workers N``: the parent that keeps N worker processes serving one port.

Each worker binds its own listening socket on the port with ``SO_REUSEPORT``, so the kernel hands
each new connection to one worker's queue by a hash of its addresses: a burst of connections is
spread over the workers. One socket shared by every worker (what uvicorn's ``--workers`` does) let
whichever worker woke first accept the whole burst. Measured on the 2-core test machine with 16
keep-alive connections opened at once (the cached phase of ``bench/load.py``):

- one shared socket, 5 tries: all 16 went to one worker in 3 of them (about 900 req/s, p99 37 ms);
  the other two split 1/15 and 7/9;
- ``SO_REUSEPORT``, 6 tries: every split was between 6/10 and 8/8 (1,570-1,680 req/s, p99
  21.6-23.6 ms). In 12 more tries, three were uneven, at 5/11, 4/12 and 3/13, with p99 25-29 ms.
  So the split is the hash's, even only on average, as with nginx's ``reuseport``.

The parent starts the workers (``spawn``: each imports and loads everything itself), starts another
in place of one that dies (after a pause that doubles, from 1 s to a minute, while replacements keep
dying within a minute of their start), and on SIGINT or SIGTERM sends every worker SIGTERM (each
drains, writes its last figures and stops) and waits. A dead worker's live Prometheus gauges are
dropped from the sums at once. A worker of the first start whose app fails to start exits with
``STARTUP_FAILURE``; the parent then stops them all and exits 1 rather than restart workers that
would fail the same way; a replacement that fails to start is retried with the pause.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

log = logging.getLogger("headfleet.workers")

STARTUP_FAILURE = 3
STOP_WAIT_S = 30.0  # how long a stopping worker may take before it is killed
STABLE_S = 60.0  # a worker that lived this long resets the restart pause
PAUSE_S = (1.0, 60.0)  # the first and the longest pause before restarting a worker that keeps dying


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other sockets of this user may share (``SO_REUSEPORT``),
    not yet listening: uvicorn listens once the app has started, and until then the kernel gives
    new connections to the workers that listen (a worker still loading its backbone gets none)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _leave_with_parent(parent: int) -> None:
    """A daemon thread's loop: when the parent is gone (killed outright, so it never stopped this
    worker), stop as on SIGTERM rather than serve on with nobody to replace or stop workers."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            log.warning("the serve parent %s is gone; stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _worker(host: str, port: int, uvicorn_options: dict[str, Any]) -> None:
    """A worker's entry point: its own socket, then uvicorn with ``worker_app``."""
    import uvicorn

    logging.basicConfig(level=str(uvicorn_options.get("log_level", "info")).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    threading.Thread(target=_leave_with_parent, args=(os.getppid(),), name="headfleet-parent-watch",
                     daemon=True).start()
    try:
        sock = reuseport_socket(host, port)
    except OSError as exc:
        print(f"headfleet worker: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    server = uvicorn.Server(uvicorn.Config("headfleet.service.server:worker_app", factory=True, **uvicorn_options))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class Supervisor:
    """Keeps ``n`` workers serving ``host:port`` until SIGINT or SIGTERM (see the module docstring)."""

    def __init__(self, n: int, host: str, port: int, uvicorn_options: dict[str, Any]):
        self.n, self.host, self.port, self.options = n, host, port, uvicorn_options
        self.stop = threading.Event()
        self._context = multiprocessing.get_context("spawn")
        self.processes: list = []
        self.restarts = 0

    def _start(self):
        p = self._context.Process(target=_worker, args=(self.host, self.port, self.options), name="headfleet-worker")
        p.start()
        p.started_at = time.monotonic()
        return p

    def run(self) -> int:
        """Serve until stopped; 0, or 1 when a worker failed to start."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        from headfleet.service.metrics import Metrics

        failed = False
        self.processes = [self._start() for _ in range(self.n)]
        first = {p.pid for p in self.processes}  # the first start: a failure there is the setup's
        pause = [0.0] * self.n
        due: list[float | None] = [None] * self.n  # when a dead worker's replacement starts
        log.info("started workers %s", sorted(first))
        while not self.stop.wait(0.5):
            for i, p in enumerate(self.processes):
                if due[i] is not None:
                    if time.monotonic() >= due[i]:
                        self.processes[i], due[i] = self._start(), None
                        self.restarts += 1
                    continue
                if p.is_alive():
                    continue
                Metrics.process_exited(p.pid)
                if p.exitcode == STARTUP_FAILURE and p.pid in first:
                    log.error("worker %s failed to start (see above); stopping", p.pid)
                    failed = True
                    self.stop.set()
                    break
                short = time.monotonic() - p.started_at < STABLE_S
                pause[i] = min(PAUSE_S[1], max(PAUSE_S[0], pause[i] * 2)) if short else 0.0
                log.warning("worker %s exited with %s; starting another%s", p.pid, p.exitcode,
                            f" in {pause[i]:.0f} s" if pause[i] else "")
                due[i] = time.monotonic() + pause[i]
        self._stop_all()
        return 1 if failed else 0

    def _stop_all(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn drains and runs the lifespan's shutdown
        deadline = time.monotonic() + STOP_WAIT_S
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker %s did not stop in %.0f s; killing it", p.pid, STOP_WAIT_S)
                p.kill()
                p.join()
