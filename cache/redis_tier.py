"""The shared tier: vectors in Redis, visible to every replica.

Redis is an optimisation, never a dependency: when it is unreachable, reads come back as
misses and writes are dropped (both counted), and the tier stops contacting Redis for
``retry_after_s`` so that a dead server costs one failed call per window rather than a
connect timeout on every request. The first call after the window probes again.

Health is the present, not the last request's outcome: :meth:`RedisTier.probe` pings Redis
(connect timeout 0.25 s, reply timeout 0.5 s) at most once per ``probe_every_s`` and caches the
answer, so a readiness endpoint polled with no traffic sees an outage or a recovery within
about a second. ``outages`` counts healthy -> unhealthy transitions since start.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import CORRUPT, Entry, check_batch
from .redis_codec import decode, encode, fingerprint_tag

log = logging.getLogger(__name__)

T = TypeVar("T")

# What "Redis is not answering" looks like; RedisError also covers refused commands
# (OOM, READONLY replica), which the cache survives the same way.
_OUTAGE = (redis.RedisError, OSError)


class RedisTier:
    """``get_many`` is one MGET, ``put_many`` one non-transactional pipeline of SETs.

    Health is exposed through ``healthy``, ``last_error`` and ``status()``; counters:
    ``errors`` (failed calls), ``recoveries`` (unhealthy -> healthy), ``corrupt`` (values that
    did not decode), ``skipped`` (calls not attempted during the back-off window) and
    ``dropped_writes`` (vectors not written because Redis was down or skipped).
    """

    name = "redis"
    needs_namespace = False
    remote = True  # asked off the request path, from the batch worker

    def __init__(
        self,
        url: str,
        dim: int,
        fingerprint: str,
        ttl_s: int | None = None,
        prefix: str = "hf",
        retry_after_s: float = 1.0,
        probe_every_s: float = 1.0,
    ):
        self.dim = int(dim)
        self.ttl_s = ttl_s
        self.prefix = f"{prefix}:v1:"
        self.retry_after_s = float(retry_after_s)
        self.probe_every_s = float(probe_every_s)
        self._probed_at = float("-inf")
        self._tag = fingerprint_tag(fingerprint)
        # Short timeouts, and one immediate retry on connection errors only (a connection
        # dropped mid-command), never on timeouts: a stalled Redis costs a single socket
        # timeout, then our own back-off takes over. The policy is pinned explicitly because
        # redis-py's defaults differ between constructors and versions (Redis() alone
        # retries timeouts ten times with back-off).
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=0.25,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self.healthy = True
        self.last_error: str | None = None
        self.errors = 0
        self.recoveries = 0
        self.outages = 0
        self.corrupt = 0
        self.skipped = 0
        self.dropped_writes = 0

    def redis_key(self, key: bytes) -> str:
        return self.prefix + key.hex()

    # -- outage handling -------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, force: bool = False) -> tuple[bool, T | None]:
        """Run ``fn`` unless in the back-off window; returns (ok, result). Never raises outages."""
        if not force and time.monotonic() < self._skip_until:
            with self._lock:
                self.skipped += 1
            return False, None
        try:
            result = fn()
        except _OUTAGE as exc:
            with self._lock:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.healthy:
                    log.warning("Redis unavailable, retrying in %.1fs: %s", self.retry_after_s, self.last_error)
                    self.outages += 1
                self.healthy = False
                self._skip_until = time.monotonic() + self.retry_after_s
            return False, None
        with self._lock:
            if not self.healthy:
                self.healthy = True
                self.recoveries += 1
                log.warning("Redis reachable again")
        return True, result

    # -- tier protocol ---------------------------------------------------------------------

    def get_many(self, keys: list[bytes]) -> list[Entry]:
        if not keys:
            return []
        names = [self.redis_key(k) for k in keys]
        ok, values = self._call(lambda: self._client.mget(names))
        if not ok or values is None:
            return [None] * len(keys)
        out = [decode(v, self.dim, self._tag) for v in values]
        bad = sum(1 for v in out if v is CORRUPT)
        if bad:
            with self._lock:
                self.corrupt += bad
        return out

    def put_many(self, keys: list[bytes], vectors: np.ndarray, namespaces: list[str]) -> None:
        check_batch(keys, vectors, namespaces, self.dim)
        if not keys:
            return

        def write() -> Any:
            pipe = self._client.pipeline(transaction=False)
            for key, row in zip(keys, vectors):
                pipe.set(self.redis_key(key), encode(row, self._tag), ex=self.ttl_s)
            return pipe.execute()

        ok, _ = self._call(write)
        if not ok:
            with self._lock:
                self.dropped_writes += len(keys)

    def nbytes(self) -> int:
        """Server-wide ``used_memory`` (O(1)); 0 while Redis is unreachable.

        The figure covers the whole Redis database, not only this prefix: counting our keys
        would need a SCAN over the keyspace, too costly for a metrics endpoint.
        """
        ok, info = self._call(lambda: self._client.info("memory"))
        return int(info.get("used_memory", 0)) if ok and info else 0

    def __len__(self) -> int:
        """Server-wide ``DBSIZE`` (see ``nbytes`` for why not per prefix); 0 when unreachable."""
        ok, size = self._call(self._client.dbsize)
        return int(size) if ok and size is not None else 0

    # -- health ----------------------------------------------------------------------------

    def ping(self) -> bool:
        """Contact Redis now, ignoring the back-off window (for readiness probes)."""
        ok, pong = self._call(self._client.ping, force=True)
        return bool(ok and pong)

    def probe(self) -> bool:
        """Whether Redis answers now: a PING (bounded by the socket timeouts, at most ~0.75 s) when the
        last probe is older than ``probe_every_s`` seconds, else the cached answer. Updates
        ``healthy``, ``outages`` and ``recoveries`` like any other call."""
        now = time.monotonic()
        with self._lock:
            fresh = now - self._probed_at < self.probe_every_s
            if fresh:
                return self.healthy
            self._probed_at = now
        return self.ping()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "healthy": self.healthy,
                "errors": self.errors,
                "recoveries": self.recoveries,
                "outages": self.outages,
                "last_error": self.last_error,
                "corrupt": self.corrupt,
                "skipped": self.skipped,
                "dropped_writes": self.dropped_writes,
            }

    def close(self) -> None:
        self._client.close()
