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

**Affinity and retries** (``affinity=True``, ``--affinity``): a light router deployment is the
ingress instead (Ray's proxy -> router -> a replica, through a ``DeploymentHandle``). A request
with one text (``/classify``, ``/embed``, ``/v1/embeddings``) carries a bucket of that text's
content hash as its ``multiplexed_model_id`` (``bucket``: xxh3_64 of the normalised text mod
``BUCKETS``), so Ray's multiplexed routing sends the same text to the replica that served it
before (each replica registers its buckets with ``@serve.multiplexed``) and that replica's memory
tier answers. The router also retries an idempotent request (every GET; POST ``/classify``,
``/embed``, ``/v1/embeddings``) on another replica when the one it was sent to dies under it
(``RETRIES`` times; the answer then carries ``X-Headfleet-Retried: <n>``); anything else answers 503 ``backend_error`` saying the replica stopped.

``headfleet serve --ray`` calls :func:`run`; ``serve run`` / ``serve deploy`` use :func:`build`
(``import_path: headfleet.service.ray_serve:build``) with settings from the ``HEADFLEET_*``
environment (``runtime_env.env_vars`` in the config).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import xxhash
from ray import serve
from ray.exceptions import RayActorError

from headfleet.errors import ValidationError
from headfleet.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "headfleet"
DEPLOYMENT = "headfleet"
#: Requests one replica accepts at once: high, so its scheduler sees many requests to batch and
#: answers 429 itself (per tenant) when its queue is full; Ray's default (5) would starve batching.
MAX_ONGOING = 256
REPLICA_HEADER = "x-headfleet-replica"
RETRIED_HEADER = "x-headfleet-retried"  # on an answer the router got after retrying: the retries
ROUTER = "headfleet-router"
#: Affinity buckets (multiplexed model ids); each replica keeps every bucket it was given
#: (``max_num_models_per_replica``), so a bucket stays where it was first placed.
BUCKETS = 64
RETRIES = 2  # extra attempts of an idempotent request whose replica died under it
AFFINITY_PATHS = ("/classify", "/embed", "/v1/embeddings")
IDEMPOTENT_POSTS = AFFINITY_PATHS


@serve.ingress()
class HeadfleetReplica:
    """One replica: ``create_app(settings)`` built on the replica (late-bound ingress), started by
    Ray Serve through its ASGI lifespan and stopped the same way when the replica goes."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from headfleet.service.app import create_app

        return tag_replica(create_app(self.settings), serve.get_replica_context().replica_id.unique_id)


class HeadfleetBackend:
    """One replica behind the router (``affinity``): the same app, started in the constructor
    (its lifespan entered here, left in ``__del__`` when Ray stops the replica) and called in
    process by :meth:`http`; not an ingress (Ray allows one per application: the router)."""

    async def __init__(self, settings: Settings):
        from headfleet.service.app import create_app

        self._app = create_app(settings)
        self._life = self._app.lifespan()
        await self._life.__aenter__()
        self.app = tag_replica(self._app, serve.get_replica_context().replica_id.unique_id)

    async def __del__(self):
        life, self._life = getattr(self, "_life", None), None
        if life is not None:
            await life.__aexit__(None, None, None)

    @serve.multiplexed(max_num_models_per_replica=BUCKETS)
    async def _bucket(self, bucket: str) -> str:
        """Register an affinity bucket on this replica (nothing to load: the memory tier is the model)."""
        return bucket

    async def http(self, request: dict) -> dict:
        """One HTTP request from the router, run through this replica's app in process.

        ``request``: ``method``, ``path``, ``query_string`` (bytes), ``headers`` (list of
        ``(bytes, bytes)``), ``body`` (bytes). Returns ``status`` (int), ``headers``, ``body``
        (bytes). The client is treated as connected until the response is complete."""
        bucket = serve.get_multiplexed_model_id()
        if bucket:
            await self._bucket(bucket)
        return await call_asgi(self.app, request)


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
                num_cpus: float | None = None, target_ongoing: float = 16.0, max_ongoing: int = MAX_ONGOING,
                affinity: bool = False, access_log: bool = False):
    """The bound Ray Serve application: ``replicas`` fixed replicas (default 1), or ``autoscale``
    ``(min, max)`` replicas scaled on ``target_ongoing`` requests in flight per replica.
    ``num_cpus``: CPUs Ray reserves per replica (default 1; torch threads follow it unless
    ``settings.threads`` is set). ``affinity``: the router in front (cache affinity and retries;
    see the module docstring). ``access_log``: Ray's per-request log lines in the replicas' logs (off:
    headfleet's own metrics count requests). ValidationError for a replica count below 1."""
    if replicas is not None and autoscale is not None:
        raise ValidationError("give --replicas or --autoscale, not both")
    if replicas is not None and replicas < 1:
        raise ValidationError(f"--replicas must be at least 1, not {replicas}")
    cpus = 1.0 if num_cpus is None else float(num_cpus)
    from headfleet.service.peers import new_group

    # the replicas are one group (service.peers): /stats adds up theirs, a backbone reload reaches each
    settings = dataclasses.replace(absolute(settings), peer_group=settings.peer_group or new_group())
    if settings.threads is None:
        settings = dataclasses.replace(settings, threads=max(1, int(cpus)))
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": max_ongoing,
        "ray_actor_options": {"num_cpus": cpus},
        # a replica loads the backbone in its lifespan; a slow disk must not make Ray kill it
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
        "logging_config": {"enable_access_log": access_log},
    }
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(1, autoscale[0]),
                                         "target_ongoing_requests": target_ongoing}
    else:
        options["num_replicas"] = replicas or 1
    if not affinity:
        return serve.deployment(HeadfleetReplica).options(**options).bind(settings)
    backend = serve.deployment(HeadfleetBackend).options(**options).bind(settings)
    router = serve.deployment(RouterReplica).options(
        name=ROUTER, num_replicas=1, max_ongoing_requests=4 * max_ongoing, ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": access_log})
    return router.bind(backend, settings.max_body_bytes)


def build(args: dict[str, Any]):
    """The application builder for ``serve run`` / ``serve deploy``
    (``import_path: headfleet.service.ray_serve:build``). ``args`` (the config's ``args``):
    ``replicas`` (int), ``autoscale`` (``"MIN:MAX"``), ``num_cpus`` (per replica),
    ``target_ongoing_requests``, ``affinity`` and ``access_log`` (bools); everything else comes from the ``HEADFLEET_*`` environment."""
    args = dict(args or {})
    unknown = set(args) - {"replicas", "autoscale", "num_cpus", "target_ongoing_requests", "affinity", "access_log"}
    if unknown:
        raise ValidationError(f"unknown headfleet application args: {sorted(unknown)}")
    autoscale = parse_autoscale(args["autoscale"]) if args.get("autoscale") else None
    replicas = int(args["replicas"]) if args.get("replicas") is not None else None
    return application(Settings.from_env(), replicas=replicas, autoscale=autoscale,
                       num_cpus=args.get("num_cpus"), target_ongoing=float(args.get("target_ongoing_requests", 16)),
                       affinity=bool(args.get("affinity", False)), access_log=bool(args.get("access_log", False)))


def run(settings: Settings, *, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
        num_cpus: float | None = None, affinity: bool = False, access_log: bool = False, address: str | None = None,
        blocking: bool = True) -> None:
    """Start (or join, ``address`` / ``RAY_ADDRESS``) a Ray cluster, put Ray Serve's HTTP proxy on
    ``settings.host:settings.port`` and deploy the application; with ``blocking``, serve until
    interrupted, then delete the application."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = application(settings, replicas=replicas, autoscale=autoscale, num_cpus=num_cpus, affinity=affinity,
                      access_log=access_log)
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


# -- the router (affinity and retries) ---------------------------------------------------------------


async def call_asgi(app, request: dict) -> dict:
    """Run one HTTP request through an ASGI ``app`` and collect its response (see
    :meth:`HeadfleetReplica.http` for the shapes)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request["query_string"], "root_path": "",
             "headers": request["headers"], "client": None, "server": None}
    done = asyncio.Event()
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await done.wait()  # "still connected" until the answer is out
        return {"type": "http.disconnect"}

    out: dict = {"status": 500, "headers": [], "body": b""}
    chunks: list[bytes] = []

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    out["body"] = b"".join(chunks)
    return out


def bucket(method: str, path: str, body: bytes) -> str | None:
    """The affinity bucket of a one-text request (``"b<n>"``, ``n < BUCKETS``), else None:
    xxh3_64 of the normalised text, the part of the cache key every tenant shares."""
    if method != "POST" or path not in AFFINITY_PATHS or not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    texts = doc.get("texts") if path == "/classify" else doc.get("inputs", doc.get("input"))
    if isinstance(texts, list) and len(texts) == 1:
        texts = texts[0]
    if not isinstance(texts, str):
        return None
    from headfleet.cache.keys import normalise_text

    try:
        return f"b{xxhash.xxh3_64_intdigest(normalise_text(texts).encode('utf-8', 'surrogatepass')) % BUCKETS}"
    except (UnicodeError, ValueError):
        return None


def _error(status: int, message: str, error_type: str) -> dict:
    return {"status": status, "headers": [(b"content-type", b"application/json")],
            "body": json.dumps({"error": message, "error_type": error_type}).encode()}


class HeadfleetRouter:
    """The ingress with ``--affinity``: reads the request, picks the affinity bucket, calls a
    replica's :meth:`HeadfleetReplica.http` through the deployment handle, retries idempotent
    requests whose replica died. ``max_body`` (bytes): longer bodies are refused with 413 here."""

    def __init__(self, replicas, max_body: int):
        self.replicas = replicas
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:  # an ASGI app: Ray's proxy hands it raw requests
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _reply(send, _error(413, f"request body over {self.max_body} bytes "
                                               "(HEADFLEET_MAX_BODY_BYTES)", "too_large"))
                return
            body.append(chunk)
            more = message.get("more_body", False)
        request = {"method": scope["method"], "path": scope["path"], "query_string": scope.get("query_string", b""),
                   "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", ())], "body": b"".join(body)}
        await _reply(send, await self.forward(request))

    async def forward(self, request: dict) -> dict:
        key = bucket(request["method"], request["path"], request["body"])
        handle = self.replicas if key is None else self.replicas.options(multiplexed_model_id=key)
        idempotent = request["method"] in ("GET", "HEAD") or (
            request["method"] == "POST" and request["path"] in IDEMPOTENT_POSTS)
        attempts = 1 + (RETRIES if idempotent else 0)
        for attempt in range(attempts):
            try:
                out = await handle.http.remote(request)
                if attempt:  # the client can tell its request was answered by a second replica
                    out["headers"] = [*out["headers"], (RETRIED_HEADER.encode(), str(attempt).encode())]
                return out
            except RayActorError:  # the replica died (or became unreachable) under the request
                log.warning("replica died under %s %s (attempt %d of %d)", request["method"], request["path"],
                            attempt + 1, attempts)
        what = "retried on other replicas, which also stopped" if idempotent else \
            "not retried, as it may have taken effect; check its outcome (GET) before sending it again"
        return _error(503, f"the replica answering this request stopped ({what})", "backend_error")


@serve.ingress()
class RouterReplica:
    """The router's deployment: :class:`HeadfleetRouter` as a late-bound ingress."""

    def __init__(self, replicas, max_body: int):
        self.router = HeadfleetRouter(replicas, max_body)

    def __serve_build_asgi_app__(self):
        return self.router


async def _reply(send, response: dict) -> None:
    await send({"type": "http.response.start", "status": response["status"], "headers": response["headers"]})
    await send({"type": "http.response.body", "body": response["body"]})
