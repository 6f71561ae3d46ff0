"""The one store behind which all monitoring state lives: feedback, canary sets, windows,
reservoirs, monitor settings, alerts.

Guarantees, and how each is kept:

- **Survives restarts.** ``FileStore`` writes a value to a same-directory temp file, fsyncs it,
  ``os.replace``-s it over the key's file and fsyncs the folder; ``RedisStore`` keeps values
  without a TTL.
- **Atomic values.** A reader sees a key's old value or its new one, never half: a rename over
  the old file (readers hold the inode they opened), a single ``SET`` in Redis.
- **Replicas add up.** Several processes on one machine share a ``FileStore`` root; several
  machines share a ``RedisStore`` (url, prefix). Read-modify-write goes under ``lock(key)``:
  an ``flock`` on ``<root>/.locks/<key>@`` (released by the kernel when a holder dies), or a
  redis-py ``Lock`` with a lease (``lock_lease_s``) so a crashed holder cannot block forever.
  A lease that runs out inside the with-block is reported (``BackendError``), not ignored.
- **A key cannot escape the store.** Keys are ``/``-separated paths of names, each matching
  ``headfleet.names.NAME_RE`` (lower-case ``a-z 0-9 _ . -``, starting with a letter or digit, at
  most 64 characters), at most ``MAX_DEPTH`` names: no empty part, ``.``, ``..``, NUL, backslash,
  leading ``/`` or hidden name gets through ``check_key``, which every method calls first.
- **Prefixes end at a name boundary.** ``keys("acme/spam")`` is ``acme/spam`` itself (when set)
  and everything under ``acme/spam/``; never ``acme/spam2/...``. ``""`` means every key.
- **Clear failures.** A store that cannot be reached or written raises
  ``headfleet.errors.BackendError`` (HTTP 503) naming the backend and the cause, never a raw
  ``redis`` or ``OSError`` exception; a bad key raises ``ValidationError`` (422).

Layout: key ``acme/spam/windows/000012`` is the file ``<root>/acme/spam/windows/000012@`` or the
Redis string ``{prefix}:monitor:acme/spam/windows/000012``. The ``@`` (outside the name
alphabet) lets ``acme/spam`` and ``acme/spam/settings`` both be keys on a filesystem, as they can
be in Redis. Lock files are never deleted (unlinking a lock file another process holds would let
a third lock a fresh inode), so a deleted tenant leaves empty files under ``.locks``.
``FileStore`` relies on ``flock`` and is for one machine; replicas on several machines use Redis.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockNotOwnedError
from redis.retry import Retry

from headfleet.atomic import fsync_dir
from headfleet.errors import BackendError, ValidationError
from headfleet.names import NAME_RE
from headfleet.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Most names in one key (keeps file paths far below PATH_MAX).
MAX_DEPTH = 16
#: Marks a value file (and a lock file); not a name character, so never a folder's name.
SUFFIX = "@"
#: ``FileStore``'s folder of lock files, under the root; hidden, so never listed as a key.
LOCKS_DIR = ".locks"


# -- keys --------------------------------------------------------------------------------------


def check_key(key: str, what: str = "key") -> tuple[str, ...]:
    """The names of ``key`` (``"acme/spam/settings"`` -> ``("acme", "spam", "settings")``).

    Raises ``ValidationError`` unless ``key`` is 1..``MAX_DEPTH`` ``/``-separated names, each
    matching ``NAME_RE``; so no empty part, ``.``, ``..``, NUL, backslash, leading or trailing
    ``/``, upper case or hidden name.
    """
    if not isinstance(key, str) or not key:
        raise ValidationError(f"invalid state {what} {key!r}: a non-empty '/'-separated path of names")
    parts = tuple(key.split("/"))
    if len(parts) > MAX_DEPTH:
        raise ValidationError(f"invalid state {what} {key!r}: more than {MAX_DEPTH} names")
    for part in parts:
        if not NAME_RE.fullmatch(part) or part in (".", ".."):
            raise ValidationError(
                f"invalid state {what} {key!r}: part {part!r} is not a name "
                "(1-64 of a-z 0-9 _ . - starting with a letter or digit)"
            )
    return parts


def make_key(*parts: str) -> str:
    """Join names into a key (``make_key("acme", "spam", "settings")``), checking each."""
    key = "/".join(parts)
    check_key(key)
    return key


def _check_prefix(prefix: str) -> tuple[str, ...]:
    """``()`` for ``""`` (every key), else the names of ``prefix`` (one trailing ``/`` allowed)."""
    if prefix == "":
        return ()
    if isinstance(prefix, str) and prefix.endswith("/") and not prefix.endswith("//"):
        prefix = prefix[:-1]
    return check_key(prefix, "prefix")


def _check_value(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"state values are bytes, got {type(value).__name__}")
    return bytes(value)


# -- the interface -----------------------------------------------------------------------------


@runtime_checkable
class StateStore(Protocol):
    """Bytes under ``/``-separated keys, shared by every process (and replica) that opens the same
    store. Every method raises ``ValidationError`` for a key ``check_key`` refuses and
    ``BackendError`` when the backend cannot be reached or written."""

    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` when there is none."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any old value atomically (a reader sees the old
        value or the new one, never part of either). ``TypeError`` unless ``value`` is bytes-like."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing happens when it is not set."""
        ...

    def keys(self, prefix: str = "") -> list[str]:
        """The keys equal to ``prefix`` or under ``prefix + "/"``, sorted; ``""``: every key."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove the keys ``keys(prefix)`` would list (deleting a classifier or a tenant); returns
        how many this call removed. ``prefix`` must name at least one name (``""`` is refused, so
        no call wipes every tenant). Not atomic against concurrent writers under the prefix."""
        ...

    def lock(self, key: str, timeout_s: float = 10.0) -> ContextManager[None]:
        """Hold an exclusive lock named ``key`` for the with-block, across threads, processes and
        (for Redis) machines. Waits at most ``timeout_s`` seconds, then raises ``BackendError``.
        Lock names are separate from value keys: locking ``acme/spam`` locks nothing else."""
        ...

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


# -- files ---------------------------------------------------------------------------------------


class FileStore:
    """One file per key under ``root`` (normally ``Settings.layout.monitor``).

    ``root`` need not exist: reads see an empty store, the first ``put`` (or ``lock``) creates
    it. Files are written private to the user (mode 0600): feedback holds tenants' texts.
    ``errors`` counts calls that raised ``BackendError``.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.errors = 0
        self._count = threading.Lock()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- paths and failures -----------------------------------------------------------------

    def _file(self, parts: tuple[str, ...], base: Path | None = None) -> Path:
        return (base or self.root).joinpath(*parts[:-1], parts[-1] + SUFFIX)

    @contextlib.contextmanager
    def _failures(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            with self._count:
                self.errors += 1
            raise BackendError(
                f"monitoring state store: {op} {key!r} under {self.root} failed "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def _makedirs(self, folder: Path) -> None:
        """``mkdir -p`` that fsyncs each new entry's parent, so a new folder survives a crash."""
        missing: list[Path] = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            fsync_dir(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove ``folder`` and its parents while they are empty, stopping at the root."""
        root = self.root
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone / being written): stop here
                return
            folder = folder.parent
        with contextlib.suppress(OSError):
            fsync_dir(folder)

    # -- StateStore ---------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        path = self._file(check_key(key))
        with self._failures("get", key):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except (FileNotFoundError, NotADirectoryError):
                return None

    def put(self, key: str, value: bytes) -> None:
        path = self._file(check_key(key))
        data = _check_value(value)
        with self._failures("put", key):
            for attempt in range(8):  # a concurrent delete may prune the folder between the two calls
                self._makedirs(path.parent)
                try:
                    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                    break
                except FileNotFoundError:
                    if attempt == 7:
                        raise
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            fsync_dir(path.parent)

    def delete(self, key: str) -> None:
        path = self._file(check_key(key))
        with self._failures("delete", key):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
            fsync_dir(path.parent)
            self._prune(path.parent)

    def keys(self, prefix: str = "") -> list[str]:
        parts = _check_prefix(prefix)
        found: list[str] = []
        with self._failures("keys", prefix):
            if parts and self._file(parts).is_file():
                found.append("/".join(parts))
            top = self.root.joinpath(*parts)
            # os.walk skips folders that vanish under it (a concurrent delete_prefix).
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if NAME_RE.fullmatch(d)]  # skips .locks
                rel = Path(dirpath).relative_to(self.root).parts
                for name in filenames:
                    stem = name[: -len(SUFFIX)]
                    if name.endswith(SUFFIX) and NAME_RE.fullmatch(stem):
                        found.append("/".join((*rel, stem)))
        return sorted(found)

    def delete_prefix(self, prefix: str) -> int:
        parts = _check_prefix(prefix)
        if not parts:
            raise ValidationError("delete_prefix needs a prefix of at least one name; '' would delete every tenant")
        removed = 0
        with self._failures("delete_prefix", prefix):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self._file(parts).unlink()
                removed += 1
            top = self.root.joinpath(*parts)
            for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
                for name in filenames:  # values, and temp files a crashed put left behind
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except FileNotFoundError:  # another deleter got it first: not ours to count
                        continue
                    removed += name.endswith(SUFFIX)
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            self._prune(top.parent)
        return removed

    @contextlib.contextmanager
    def lock(self, key: str, timeout_s: float = 10.0) -> Iterator[None]:
        path = self._file(check_key(key), self.root / LOCKS_DIR)
        with self._failures("lock", key):
            self._makedirs(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with self._failures("lock", key):
                self._acquire(fd, key, timeout_s)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, key: str, timeout_s: float) -> None:
        """``flock`` ``fd`` exclusively, polling (1 ms doubling to 50 ms) until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    with self._count:
                        self.errors += 1
                    raise BackendError(
                        f"monitoring state store: lock {key!r} under {self.root} still held by "
                        f"another process after {timeout_s:g}s"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def close(self) -> None:
        pass


# -- Redis ---------------------------------------------------------------------------------------

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
        lock_lease_s: float = 30.0,
        connect_timeout_s: float = 0.5,
        timeout_s: float = 1.0,
        scan_count: int = 500,
    ):
        if not prefix or any(c in prefix for c in " \r\n\x00"):
            raise ValidationError(f"invalid Redis prefix {prefix!r}")
        self.where = _where(url)
        self.namespace = f"{prefix}:monitor:"
        self.lock_namespace = f"{prefix}:monitor-lock:"
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


# -- choosing one ------------------------------------------------------------------------------


def open_store(settings: Settings) -> StateStore:
    """``RedisStore(settings.redis_url, settings.redis_prefix)`` when a Redis url is configured
    (replicas on several machines share it), else ``FileStore(settings.layout.monitor)``.
    Nothing is contacted until the first call."""
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.redis_prefix)
    return FileStore(settings.layout.monitor)
