"""A real headfleet server on a free loopback port, run by uvicorn in a thread (tests only)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

from headfleet.service.app import create_app
from headfleet.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, settings: Settings, embedder):
        self.app = create_app(settings, embedder=embedder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                http="httptools", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 180
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the headfleet server did not start (see the log above)")
            time.sleep(0.05)

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@contextlib.contextmanager
def running(embedder, data_dir, **overrides):
    """A server on ``Settings(data_dir, device="cpu", **overrides)``, stopped on exit."""
    server = RunningServer(Settings(data_dir=data_dir, device="cpu", **overrides), embedder)
    try:
        yield server
    finally:
        server.stop()


def as_(server, key: str | None) -> httpx.Client:
    """A client of ``server`` that sends ``key`` as a Bearer token (none: no header)."""
    return httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {key}"} if key else {})


def wait_for_job(c: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    """Poll ``GET /jobs/{id}`` until the job succeeded or failed; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()["job"]
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")
