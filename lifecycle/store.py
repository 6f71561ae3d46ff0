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

from typing import ContextManager, Protocol, runtime_checkable

from headfleet.errors import ValidationError
from headfleet.names import NAME_RE
from headfleet.settings import Settings

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


# -- choosing one ------------------------------------------------------------------------------


def open_store(settings: Settings, space: str = "monitor") -> StateStore:
    """The store of one lifecycle ``space`` (``"monitor"``: monitoring and shadows; ``"experiments"``):
    ``RedisStore(settings.redis_url, settings.redis_prefix, space=space)`` when a Redis url is
    configured (replicas on several machines share it), else a ``FileStore`` in the data folder
    (``settings.layout.monitor`` / ``.experiments``). Nothing is contacted until the first call."""
    if space not in ("monitor", "experiments"):
        raise ValueError(f"unknown lifecycle store space {space!r}")
    if settings.redis_url:
        from headfleet.lifecycle.store_redis import RedisStore

        return RedisStore(settings.redis_url, settings.redis_prefix, space=space)
    from headfleet.lifecycle.store_file import FileStore

    return FileStore(getattr(settings.layout, space))
