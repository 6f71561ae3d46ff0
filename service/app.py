"""``create_app()``: the Litestar app — controllers, one error table, a lifespan that owns the state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import AsyncIterator

from litestar import Litestar
from litestar.di import Provide

from headfleet.service.api.admin import AdminController
from headfleet.service.api.classifiers import ClassifiersController, JobsController
from headfleet.service.api.classify import ClassifyController
from headfleet.service.api.deps import provide_service, provide_tenant
from headfleet.service.api.embeddings import EmbeddingsController
from headfleet.service.api.experiments import ExperimentsController, ShadowController
from headfleet.service.api.monitoring import FeedbackController, MonitorController
from headfleet.service.api.ops import OpsController
from headfleet.service.dashboard import DashboardController
from headfleet.service.backbone_admin import PlanJob, Reloader, reload_gate
from headfleet.service.errors import HANDLERS
from headfleet.service.metrics import ENDPOINTS, Metrics, refresh_gauges
from headfleet.service.openapi import document_errors, openapi_config
from headfleet.service.request import HeadfleetRequest
from headfleet.service.state import Service
from headfleet.settings import Settings

log = logging.getLogger("headfleet.service")


def _endpoint(path: str) -> str:
    """A bounded label for the request histogram (ids in paths would explode its cardinality)."""
    if path in ENDPOINTS:
        return path
    for prefix in ("/classifiers", "/jobs", "/admin", "/schema", "/v1", "/experiments", "/dashboard"):
        if path.startswith(prefix):
            return prefix
    return "other"


def timing_middleware(app):
    """Observe every HTTP request's latency by endpoint and status class; under ``serve --workers``
    (or Ray replicas) every answer names its worker's pid in ``X-Headfleet-Worker``."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]
        worker = getattr(scope["app"].state, "worker_header", None) if "app" in scope else None

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if worker is not None:  # serve --workers: which worker answered
                    message["headers"] = [*message.get("headers", ()), worker]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            service = getattr(scope["app"].state, "service", None) if "app" in scope else None
            if service is not None:
                service.metrics.observe_request(_endpoint(scope["path"]), f"{status[0] // 100}xx",
                                                time.perf_counter() - t0)

    return middleware


def options_middleware(app):
    """Answer ``OPTIONS`` with every method the path serves. Litestar builds each path's OPTIONS
    handler from the first handler registered for it, so a controller with GET and POST on one path
    announced only one of them; the complete set is taken from the built routes (``app.state.allow``)."""

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            allow = scope["app"].state.allow.get(id(scope.get("route_handler")))
            if allow is not None:
                await send({"type": "http.response.start", "status": 204,
                            "headers": [(b"allow", ", ".join(sorted(allow)).encode())]})
                await send({"type": "http.response.body", "body": b""})
                return
        await app(scope, receive, send)

    return middleware


def _index_options(app: Litestar) -> None:
    """``app.state.allow``: id(OPTIONS handler) -> every method of its path."""
    allow: dict[int, frozenset[str]] = {}
    for route in app.routes:
        methods = frozenset(getattr(route, "methods", ()) or ())
        for handler in getattr(route, "route_handlers", ()):
            if "OPTIONS" in getattr(handler, "http_methods", ()):
                allow[id(handler)] = methods
    app.state.allow = allow


class _Member:
    """This process as a member of its serving group (``service.peers``): it publishes its cache
    figures, gauges and heartbeat, and follows a backbone reload another member was asked for, one
    at a time (a newer request met during a follow is followed next)."""

    FOLLOW_WAIT_S = 120.0  # how long shutdown waits for a follow in progress (a backbone load)

    def __init__(self, app: Litestar, settings: Settings, loop: asyncio.AbstractEventLoop):
        from headfleet.service.peers import Peers

        self.app, self.loop = app, loop
        self.asked = 0  # the newest reload generation asked for
        self.task: asyncio.Future | None = None
        self.peers = Peers(settings.data_dir, settings.peer_group, heartbeat=self.heartbeat, figures=self.figures,
                           on_reload=lambda g: loop.call_soon_threadsafe(self.want, g))

    def start(self) -> None:
        """Blocking. A member starts one generation behind, and checks at once that it serves the
        backbone the folder records (a reload may have landed while it loaded its backbone)."""
        self.peers.start()
        if self.peers.generation:
            self.peers.generation -= 1
            self.loop.call_soon_threadsafe(self.want, self.peers.generation + 1)

    def figures(self, changed_only: bool) -> dict:
        return self.app.state.service.engine.stats.export(changed_only=changed_only)  # a reload keeps them

    def heartbeat(self) -> dict:
        service = self.app.state.service
        beat = {"fingerprint": service.engine.embedder.fingerprint, "waiting": service.scheduler.waiting_by_tenant()}
        if service.metrics.multiprocess:
            refresh_gauges(service)  # the other workers' scrapes read them from the multiprocess files
            beat["counters"] = service.metrics.local_counters()
        return beat

    def want(self, generation: int) -> None:
        """On the event loop: follow ``generation`` (now, or after the follow in progress)."""
        self.asked = max(self.asked, generation)
        if (self.task is None or self.task.done()) and not self.app.state.reloader.closing:
            self.task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        while self.asked > self.peers.generation and not self.app.state.reloader.closing:
            generation = self.asked
            try:
                out = await self.app.state.reloader.reload(self.app, in_request=False)
                note = {"generation": generation, "reloaded": out["reloaded"], "paused_ms": out["paused_ms"]}
            except Exception as exc:  # said in the heartbeat, so the member that asked reports it
                log.exception("following the group's backbone reload failed")
                note = {"generation": generation, "error": str(exc)}
            await asyncio.to_thread(self.peers.followed, generation, note)

    async def settle(self) -> None:
        """Once the Reloader is closing: waits for a follow in progress (it will not swap)."""
        if self.task is not None and not self.task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.task), self.FOLLOW_WAIT_S)


def create_app(settings: Settings | None = None, *, embedder=None) -> Litestar:
    """Build the app; nothing is loaded until the lifespan runs (``embedder`` shares a loaded backbone)."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.service = await Service.start(settings, embedder)
        app.state.plan_job = PlanJob(settings)
        app.state.reloader = Reloader()
        app.state.peers = member = None
        try:
            if settings.peer_group:
                member = _Member(app, settings, asyncio.get_running_loop())
                await asyncio.to_thread(member.start)
                app.state.peers = member.peers
                app.state.worker_header = (b"x-headfleet-worker", str(os.getpid()).encode())
            yield
        finally:
            app.state.plan_job.close()
            app.state.reloader.closing = True  # no reload starts, and one in progress does not swap
            if member is not None:
                await member.settle()
            await app.state.service.stop()  # the one serving now: a backbone reload may have replaced it
            if member is not None:
                await asyncio.to_thread(member.peers.close)  # after the stop: its last figures are written
                Metrics.process_exited()

    app = Litestar(
        route_handlers=[ClassifyController, ClassifiersController, JobsController, EmbeddingsController,
                        OpsController, AdminController, FeedbackController, MonitorController, ShadowController,
                        ExperimentsController, DashboardController],
        dependencies={"service": Provide(provide_service), "tenant": Provide(provide_tenant)},
        exception_handlers=HANDLERS,
        lifespan=[lifespan],
        middleware=[reload_gate, timing_middleware, options_middleware],
        request_max_body_size=settings.max_body_bytes,
        request_class=HeadfleetRequest,
        openapi_config=openapi_config(),
    )
    document_errors(app)
    _index_options(app)
    app.state.settings = settings
    return app
