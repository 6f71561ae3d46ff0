"""``headfleet serve``: run the app under uvicorn (or, ``--ray``, as a Ray Serve deployment of
replicas), loopback-only when no keys are configured."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys

from headfleet.errors import ConflictError, ValidationError
from headfleet.service.auth import KeyStore
from headfleet.settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> KeyStore:
    """The keys; ValidationError when no keys are configured and the host is not loopback."""
    keys = KeyStore(settings.layout.keys, settings.api_keys, settings.admin_key)
    if keys.single_tenant and not is_loopback(settings.host):
        raise ValidationError(
            f"no API keys are configured, so headfleet runs single-tenant without authentication and binds to "
            f"loopback only; refusing host {settings.host!r}. Set HEADFLEET_ADMIN_KEY (then create keys with "
            "POST /admin/tenants/<tenant>/keys) or HEADFLEET_API_KEYS='tenant:key,...' to serve other machines")
    return keys


SETTINGS_ENV = "HEADFLEET_WORKER_SETTINGS"  # the parent's settings, as JSON, for ``serve --workers``' workers


def serve(settings: Settings, *, log_level: str = "info", access_log: bool = False) -> None:
    import uvicorn

    if settings.workers < 1:
        raise ValidationError(f"workers must be at least 1, not {settings.workers}")
    keys = check_exposure(settings)
    sock = bind(settings.host, settings.port)  # before the model loads: a busy port fails in milliseconds
    if keys.single_tenant:
        print(f"headfleet: single-tenant mode (no API keys configured): every request is tenant 'default'; "
              f"listening on loopback only, http://{settings.host}:{settings.port}", file=sys.stderr)
    else:
        print(f"headfleet: multi-tenant mode ({len(keys.tenants())} tenant(s) with keys); "
              f"listening on http://{settings.host}:{settings.port}", file=sys.stderr)
    print(f"headfleet: backbone {settings.backend} {settings.precision} ({settings.backbone_source})"
          + (": the first start exports it to ONNX, about 10 s" if settings.backend == "onnx"
             and not any(settings.layout.onnx.glob("*.onnx")) else ""), file=sys.stderr)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        serve_workers(settings, sock, log_level=log_level, access_log=access_log)
        return
    from headfleet.service.app import create_app

    config = uvicorn.Config(create_app(settings), log_level=log_level, access_log=access_log, http="httptools",
                            loop="uvloop", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


def serve_workers(settings: Settings, sock: socket.socket, *, log_level: str, access_log: bool) -> None:
    """``serve --workers N``: N worker processes on ``settings.port`` (``service.workers``: each its
    own ``SO_REUSEPORT`` socket, restarted when it dies), each a whole headfleet on the same data
    folder (as Ray replicas are), members of one group (``service.peers``): ``/stats`` adds every
    worker's figures, ``/metrics`` every worker's series (prometheus_client's multiprocess mode,
    ``<data>/run/<group>/prometheus``), and a backbone reload reaches every worker. Each worker gets
    ``cores // N`` backbone threads unless ``threads`` is set. ``sock``: the port, checked free; closed
    here, as each worker binds its own."""
    import dataclasses
    import json
    import os

    from headfleet.service.peers import new_group
    from headfleet.service.workers import Supervisor

    group = new_group()
    threads = settings.threads or max(1, len(os.sched_getaffinity(0)) // settings.workers)
    worker = dataclasses.replace(settings, peer_group=group, threads=threads)
    prom = settings.layout.root / "run" / group / "prometheus"
    prom.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom.resolve())  # read by prometheus_client in each worker
    os.environ[SETTINGS_ENV] = json.dumps({f.name: getattr(worker, f.name) for f in dataclasses.fields(worker)},
                                          default=str)
    print(f"headfleet: {settings.workers} workers, {threads} backbone thread(s) each, group {group}",
          file=sys.stderr)
    sock.close()
    code = Supervisor(settings.workers, settings.host, settings.port,
                      {"log_level": log_level, "access_log": access_log, "http": "httptools", "loop": "uvloop",
                       "timeout_graceful_shutdown": 10}).run()
    if code:
        sys.exit(code)


def worker_app():
    """One ``serve --workers`` worker's app, from the settings its parent left in the environment;
    the backbone is the data folder's recorded one at the worker's start (a worker restarted after a
    reload loads the new one)."""
    import dataclasses
    import json
    import os
    from pathlib import Path

    from headfleet.service.app import create_app

    try:
        values = json.loads(os.environ[SETTINGS_ENV])
        paths = {f.name for f in dataclasses.fields(Settings) if "Path" in str(f.type)}
        values = {k: Path(v) if k in paths and v is not None else v for k, v in values.items()}
        return create_app(Settings(**values).with_recorded_backbone())
    except Exception as exc:  # e.g. a damaged backbone.json: the parent stops instead of restarting forever
        from headfleet.service.workers import STARTUP_FAILURE

        print(f"headfleet worker: cannot build the app: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; ConflictError when the port is taken, ValidationError when
    the address cannot be bound (both the CLI's exit 2), so a second ``serve`` never loads the model or opens the
    data folder's stores."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConflictError(f"port {port} on {host} is already in use (another headfleet serve?); "
                                "stop it or pass --port") from None
        raise ValidationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve_ray(settings: Settings, *, replicas: int | None = None, autoscale: str | None = None,
              num_cpus: float | None = None, affinity: bool = False, log_level: str = "info",
              access_log: bool = False) -> None:
    """``headfleet serve --ray``: the app as a Ray Serve deployment (``headfleet.service.ray_serve``)
    of ``replicas`` replicas or ``autoscale`` ``"MIN:MAX"``; Ray Serve's proxy listens on
    ``settings.host:settings.port``; ``affinity``: the router in front (cache affinity, retries). ValidationError without Ray Serve installed, ConflictError
    when the port is taken (checked before Ray starts)."""
    try:
        from headfleet.service import ray_serve
    except ImportError as exc:
        raise ValidationError(f"--ray needs Ray Serve: pip install 'headfleet[ray]' ({exc})") from None
    bounds = ray_serve.parse_autoscale(autoscale) if autoscale else None
    keys = check_exposure(settings)
    bind(settings.host, settings.port).close()  # a busy port fails in milliseconds, before Ray starts
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shape = f"autoscaling {bounds[0]}..{bounds[1]} replicas" if bounds else f"{replicas or 1} replica(s)"
    if affinity:
        shape += ", cache-affinity router"
    mode = "single-tenant mode (no API keys configured)" if keys.single_tenant else \
        f"multi-tenant mode ({len(keys.tenants())} tenant(s) with keys)"
    print(f"headfleet: Ray Serve, {shape}, {mode}; http://{settings.host}:{settings.port}", file=sys.stderr)
    ray_serve.run(settings, replicas=replicas, autoscale=bounds, num_cpus=num_cpus, affinity=affinity,
                  access_log=access_log)
