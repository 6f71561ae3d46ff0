"""``RedisStore``: the state store in Redis, shared by replicas on several machines (see ``store``)."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockNotOwnedError
from redis.retry import Retry

from headfleet.errors import BackendError, ValidationError
from headfleet.lifecycle.store import _check_prefix, _check_value, check_key

T = TypeVar("T")

# What "Redis is not answering" looks like (RedisError also covers refused commands: OOM, READONLY).
_OUTAGE = (redis.RedisError, OSError)


def _glob_escape(text: str) -> str:
    """Escape Redis MATCH pattern characters (a configured prefix may contain them)."""
    return "".join("\\" + c if c in "*?[]\\^" else c for c in text)


def _where(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis url, without credentials, for messages."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class RedisStore:
    """Keys under ``{prefix}:monitor:`` in the Redis at ``url``; locks under ``{prefix}:monitor-lock:``.

    ``keys`` and ``delete_prefix`` walk the keyspace with ``SCAN MATCH`` (never ``KEYS``, which
    stalls the server); ``delete_prefix`` removes with ``UNLINK`` in batches. Values have no TTL.
    Socket timeouts are short (``connect_timeout_s``, ``timeout_s``) and a dropped connection is
    retried once, so a dead server costs about one timeout per call and then ``BackendError``.
    A lock's lease is ``lock_lease_s`` seconds: a crashed holder blocks others at most that long,
    and a with-block that outlives its lease raises ``BackendError`` on exit.
    ``errors`` counts calls that raised ``BackendError``.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "hf",
        *,
        space: str = "monitor",
        lock_lease_s: float = 30.0,
        connect_timeout_s: float = 0.5,
        timeout_s: float = 1.0,
        scan_count: int = 500,
    ):
        if not prefix or any(c in prefix for c in " \r\n\x00"):
            raise ValidationError(f"invalid Redis prefix {prefix!r}")
        self.where = _where(url)
        self.namespace = f"{prefix}:{space}:"
        self.lock_namespace = f"{prefix}:{space}-lock:"
        self.lock_lease_s = float(lock_lease_s)
        self.scan_count = int(scan_count)
        self.errors = 0
        self._count = threading.Lock()
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, {self.namespace!r})"

    def _unavailable(self, op: str, key: str, exc: BaseException) -> BackendError:
        with self._count:
            self.errors += 1
        return BackendError(
            f"monitoring state store unavailable: Redis at {self.where} failed {op} {key!r} "
            f"({type(exc).__name__}: {exc})"
        )

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _OUTAGE as exc:
            raise self._unavailable(op, key, exc) from exc

    def _scan(self, parts: tuple[str, ...]) -> set[str]:
        """The keys under ``parts`` (itself included), without the namespace."""
        base = self.namespace
        pattern = _glob_escape(base + "".join(p + "/" for p in parts)) + "*"
        found: set[str] = set()  # SCAN may return a key twice
        for name in self._client.scan_iter(match=pattern, count=self.scan_count):
            key = name.decode("utf-8", "replace")[len(base):]
            with contextlib.suppress(ValidationError):
                check_key(key)
                found.add(key)
        if parts:
            key = "/".join(parts)
            if self._client.exists(base + key):
                found.add(key)
        return found

    # -- StateStore ---------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        check_key(key)
        return self._call("get", key, lambda: self._client.get(self.namespace + key))

    def put(self, key: str, value: bytes) -> None:
        check_key(key)
        data = _check_value(value)
        self._call("put", key, lambda: self._client.set(self.namespace + key, data))

    def delete(self, key: str) -> None:
        check_key(key)
        self._call("delete", key, lambda: self._client.unlink(self.namespace + key))

    def keys(self, prefix: str = "") -> list[str]:
        parts = _check_prefix(prefix)
        return sorted(self._call("keys", prefix, lambda: self._scan(parts)))

    def delete_prefix(self, prefix: str) -> int:
        parts = _check_prefix(prefix)
        if not parts:
            raise ValidationError("delete_prefix needs a prefix of at least one name; '' would delete every tenant")

        def run() -> int:
            names = sorted(self.namespace + k for k in self._scan(parts))
            removed = 0
            for i in range(0, len(names), 500):
                removed += int(self._client.unlink(*names[i : i + 500]))
            return removed

        return self._call("delete_prefix", prefix, run)

    @contextlib.contextmanager
    def lock(self, key: str, timeout_s: float = 10.0) -> Iterator[None]:
        check_key(key)
        lk = self._client.lock(
            self.lock_namespace + key,
            timeout=self.lock_lease_s,
            sleep=0.01,
            blocking_timeout=timeout_s,
            thread_local=False,
        )
        if not self._call("lock", key, lk.acquire):
            with self._count:
                self.errors += 1
            raise BackendError(
                f"monitoring state store: lock {key!r} in Redis at {self.where} still held by another "
                f"process after {timeout_s:g}s"
            )
        try:
            yield
        except BaseException:
            with contextlib.suppress(*_OUTAGE):  # the body's error matters more; the lease ends it anyway
                lk.release()
            raise
        try:
            lk.release()
        except LockNotOwnedError as exc:
            with self._count:
                self.errors += 1
            raise BackendError(
                f"monitoring state store: lock {key!r} outlived its {self.lock_lease_s:g}s lease, so "
                "another process may have held it too; raise lock_lease_s or shorten the critical section"
            ) from exc
        except _OUTAGE as exc:
            raise self._unavailable("unlock", key, exc) from exc

    def close(self) -> None:
        self._client.close()

