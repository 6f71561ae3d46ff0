"""headfleet on Ray Serve: the same Litestar app as the ingress of a deployment of N replicas.

Each replica is one whole headfleet service (``create_app``'s lifespan: backbone, scheduler,
heads, lifecycle), so a request's embedding and its heads stay in one process, and the backbone
forward is batched across requests by the replica's own scheduler (per-tenant deficit round-robin
lanes and token budgets; ``@serve.batch`` would batch too, but FIFO, with no tenant fairness and
no cache-aware dedupe). Ray Serve owns what one process cannot do: starting, restarting and
autoscaling replicas (``num_replicas`` or ``autoscaling_config``), and the HTTP proxy that spreads
requests over them.

State the replicas share, one place each (see README "Scaling out"):

- embedding cache: each replica's memory tier, the local FAISS store on the data folder (one
  machine), and Redis (``HEADFLEET_REDIS_URL``) for every machine;
- registry, keys, namespaces, job records: the data folder, which every replica reads
  (``HEADFLEET_DATA_DIR``, a shared filesystem across machines); versions are immutable, alias
  files are stat-ed on every request, keys on every lookup;
- monitor windows, feedback, experiments, shadows: ``lifecycle.store`` (Redis when configured,
  else the data folder);
- jobs run once, on the replica that owns them, and move to another when it dies
  (``service.job_records``: owner, heartbeat, lease).

``headfleet serve --ray`` calls :func:`run`; ``serve run`` / ``serve deploy`` use :func:`build`
(``import_path: headfleet.service.ray_serve:build``) with settings from the ``HEADFLEET_*``
environment (``runtime_env.env_vars`` in the config).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve

from headfleet.errors import ValidationError
from headfleet.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "headfleet"
DEPLOYMENT = "headfleet"
#: Requests one replica accepts at once: high, so its scheduler sees many requests to batch and
#: answers 429 itself (per tenant) when its queue is full; Ray's default (5) would starve batching.
MAX_ONGOING = 256
REPLICA_HEADER = "x-headfleet-replica"


@serve.ingress()
class HeadfleetReplica:
    """One replica: ``create_app(settings)`` built on the replica (late-bound ingress), started by
    Ray Serve through its ASGI lifespan and stopped the same way when the replica goes."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from headfleet.service.app import create_app

        return tag_replica(create_app(self.settings), serve.get_replica_context().replica_id.unique_id)


def tag_replica(app, tag: str):
    """``app`` answering every HTTP response with ``X-Headfleet-Replica: <tag>`` (Ray's replica id),
    so an operator (and the tests) can tell which replica answered; lifespan passes through."""
    header = (REPLICA_HEADER.encode(), tag.encode())

    async def tagged(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await app(scope, receive, send_tagged)

    return tagged


def absolute(settings: Settings) -> Settings:
    """``settings`` with every path made absolute: replicas do not run in the caller's directory."""
    changes: dict[str, Any] = {"data_dir": Path(settings.data_dir).resolve()}
    if settings.keys_file is not None:
        changes["keys_file"] = Path(settings.keys_file).resolve()
    if settings.scoring_root is not None:
        changes["scoring_root"] = Path(settings.scoring_root).resolve()
    if settings.model_path and os.path.exists(settings.model_path):
        changes["model_path"] = str(Path(settings.model_path).resolve())
    return dataclasses.replace(settings, **changes)


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> ``(min, max)`` replicas; ValidationError unless 0 <= MIN <= MAX and MAX >= 1."""
    lo, sep, hi = str(text).partition(":")
    try:
        pair = (int(lo), int(hi)) if sep else None
    except ValueError:
        pair = None
    if pair is None or pair[0] < 0 or pair[1] < 1 or pair[0] > pair[1]:
        raise ValidationError(f"--autoscale takes MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), not {text!r}")
    return pair


def application(settings: Settings, *, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
                num_cpus: float | None = None, target_ongoing: float = 16.0, max_ongoing: int = MAX_ONGOING):
    """The bound Ray Serve application: ``replicas`` fixed replicas (default 1), or ``autoscale``
    ``(min, max)`` replicas scaled on ``target_ongoing`` requests in flight per replica.
    ``num_cpus``: CPUs Ray reserves per replica (default 1; torch threads follow it unless
    ``settings.threads`` is set). ValidationError for a replica count below 1."""
    if replicas is not None and autoscale is not None:
        raise ValidationError("give --replicas or --autoscale, not both")
    if replicas is not None and replicas < 1:
        raise ValidationError(f"--replicas must be at least 1, not {replicas}")
    cpus = 1.0 if num_cpus is None else float(num_cpus)
    settings = absolute(settings)
    if settings.threads is None:
        settings = dataclasses.replace(settings, threads=max(1, int(cpus)))
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": max_ongoing,
        "ray_actor_options": {"num_cpus": cpus},
        # a replica loads the backbone in its lifespan; a slow disk must not make Ray kill it
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(1, autoscale[0]),
                                         "target_ongoing_requests": target_ongoing}
    else:
        options["num_replicas"] = replicas or 1
    return serve.deployment(HeadfleetReplica).options(**options).bind(settings)


def build(args: dict[str, Any]):
    """The application builder for ``serve run`` / ``serve deploy``
    (``import_path: headfleet.service.ray_serve:build``). ``args`` (the config's ``args``):
    ``replicas`` (int), ``autoscale`` (``"MIN:MAX"``), ``num_cpus`` (per replica),
    ``target_ongoing_requests``; everything else comes from the ``HEADFLEET_*`` environment."""
    args = dict(args or {})
    unknown = set(args) - {"replicas", "autoscale", "num_cpus", "target_ongoing_requests"}
    if unknown:
        raise ValidationError(f"unknown headfleet application args: {sorted(unknown)}")
    autoscale = parse_autoscale(args["autoscale"]) if args.get("autoscale") else None
    replicas = int(args["replicas"]) if args.get("replicas") is not None else None
    return application(Settings.from_env(), replicas=replicas, autoscale=autoscale,
                       num_cpus=args.get("num_cpus"), target_ongoing=float(args.get("target_ongoing_requests", 16)))


def run(settings: Settings, *, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
        num_cpus: float | None = None, address: str | None = None, blocking: bool = True) -> None:
    """Start (or join, ``address`` / ``RAY_ADDRESS``) a Ray cluster, put Ray Serve's HTTP proxy on
    ``settings.host:settings.port`` and deploy the application; with ``blocking``, serve until
    interrupted, then delete the application."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = application(settings, replicas=replicas, autoscale=autoscale, num_cpus=num_cpus)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    if not blocking:
        return
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
