"""``create_app()``: the Litestar app — controllers, one error table, a lifespan that owns the state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from headfleet.service.metrics import ENDPOINTS, Metrics
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
    """Observe every HTTP request's latency by endpoint and status class."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
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


def _join_group(app: Litestar, settings: Settings, loop: asyncio.AbstractEventLoop):
    """This process as a member of its serving group (``service.peers``): it publishes its cache
    figures and heartbeat, and follows a backbone reload another member was asked for."""
    from headfleet.service.peers import Peers

    def figures(changed_only: bool) -> dict:
        return app.state.service.engine.stats.export(changed_only=changed_only)  # a reload keeps the figures

    def heartbeat() -> dict:
        service = app.state.service
        return {"fingerprint": service.engine.embedder.fingerprint, "waiting": service.scheduler.waiting_by_tenant()}

    async def follow(generation: int) -> None:
        try:
            out = await app.state.reloader.reload(app, in_request=False)
            note = {"generation": generation, "reloaded": out["reloaded"], "paused_ms": out["paused_ms"]}
        except Exception as exc:  # said in the heartbeat, so the member that asked reports it
            log.exception("following the group's backbone reload failed")
            note = {"generation": generation, "error": str(exc)}
        await asyncio.to_thread(peers.followed, generation, note)

    peers = Peers(settings.data_dir, settings.peer_group, heartbeat=heartbeat, figures=figures,
                  on_reload=lambda generation: asyncio.run_coroutine_threadsafe(follow(generation), loop))
    return peers.start()


def create_app(settings: Settings | None = None, *, embedder=None) -> Litestar:
    """Build the app; nothing is loaded until the lifespan runs (``embedder`` shares a loaded backbone)."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.service = await Service.start(settings, embedder)
        app.state.plan_job = PlanJob(settings)
        app.state.reloader = Reloader()
        app.state.peers = None
        if settings.peer_group:
            app.state.peers = await asyncio.to_thread(_join_group, app, settings, asyncio.get_running_loop())
        try:
            yield
        finally:
            app.state.plan_job.close()
            await app.state.service.stop()  # the one serving now: a backbone reload may have replaced it
            if app.state.peers is not None:
                await asyncio.to_thread(app.state.peers.close)  # after the stop: its last figures are written
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
