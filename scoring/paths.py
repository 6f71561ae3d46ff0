"""A caller's path before and after the kernel sees it: checked, encoded, and refused in the domain's words.

What every resolver of :mod:`headfleet.scoring.confined` shares (the ``openat2`` call in
:mod:`~headfleet.scoring.openat2`, the walk in :mod:`~headfleet.scoring.walk`, the
:class:`~headfleet.scoring.confined.Root` above them). The guarantee: a path the caller gave
never fails as an internal error and never makes a message name a path of the server's.
How it is kept:

    encode(rel)         before any syscall: a lone surrogate, a NUL -> ValidationError;
                        over PATH_MAX / a name over NAME_MAX -> ENAMETOOLONG (as the kernel says it)
    escape(rel)         a path that leads out -> Escape (ForbiddenError: 403), naming ``rel`` as given
    refusing(what)      around a block: an OSError the path caused (ENOENT, ELOOP, EACCES, ...) ->
                        the domain error from one table (_PATH_ERRORS); any other errno (a full disk)
                        stays an OSError, the server's own trouble

The ``O_*`` flags are the ``os`` module's, or 0 on a platform without them (``O_PATH`` 0 means
"no openat2 either": the resolvers then open ``O_RDONLY``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

from headfleet.errors import ForbiddenError, HeadfleetError, NotFoundError, ValidationError

O_PATH = getattr(os, "O_PATH", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
PATH_MAX, NAME_MAX = 4096, 255


class Escape(ForbiddenError):
    """A path that leads outside the folder a job is confined to (``path``: as the caller gave it, relative
    to the folder), or the folder itself is a symlink (``path`` None)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def escape(rel: str) -> Escape:
    """The :class:`Escape` for ``rel`` (relative to the job's folder, as the caller gave it): returned, not raised."""
    return Escape(f"{rel!r} leads outside the job's folder (through '..' or a symbolic link); "
                  "only links that stay inside it are followed", rel)


def encode(rel: str) -> bytes:
    """``rel`` as the bytes the kernel gets (``os.fsencode``).

    Raises ``ValidationError`` for a lone surrogate or a NUL character, and
    ``OSError(ENAMETOOLONG)`` for a path of ``PATH_MAX`` (4096) bytes or more or a component over
    ``NAME_MAX`` (255) bytes, before any syscall is made.
    """
    try:
        raw = os.fsencode(rel)
    except UnicodeEncodeError:
        raise ValidationError(f"the path {rel.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
                              "Unicode (a lone surrogate)") from None
    if b"\0" in raw:
        raise ValidationError(f"the path {rel!r} holds a NUL character")
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)
    return raw


# -- OSErrors of a caller's path, in the domain's words ------------------------------------------------------
_PATH_ERRORS = {
    errno.ENOENT: (NotFoundError, "does not exist"),
    errno.ENOTDIR: (ValidationError, "is not a path to a file: one of its folders is a file"),
    errno.ENAMETOOLONG: (ValidationError, "is too long a path for the filesystem (a name over 255 bytes, "
                                          "or over 4096 in all)"),
    errno.ELOOP: (ValidationError, "goes through too many symbolic links (a loop?)"),
    errno.EISDIR: (ValidationError, "is a folder where a file is needed"),
    errno.EACCES: (ForbiddenError, "cannot be read or written by the service (permission denied)"),
    errno.EPERM: (ForbiddenError, "cannot be read or written by the service (operation not permitted)"),
    errno.EILSEQ: (ValidationError, "is not a name this filesystem accepts"),
    errno.EINVAL: (ValidationError, "is not a name this filesystem accepts"),
}


def path_error(exc: OSError, what: str) -> HeadfleetError | None:
    """The domain error for an ``OSError`` that a caller's path caused (None: the server's own trouble,
    such as a full disk, which stays an internal error). ``what`` names the path as the caller gave it."""
    found = _PATH_ERRORS.get(exc.errno)
    if found is None:
        return None
    cls, says = found
    return cls(f"{what} {says}")


@contextlib.contextmanager
def refusing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` of the caller's path inside the block into the domain error (see :func:`path_error`);
    a ``UnicodeEncodeError`` (a lone surrogate) becomes a ``ValidationError``. ``what`` names the path."""
    try:
        yield
    except OSError as exc:
        err = path_error(exc, what)
        if err is None:
            raise
        raise err from None
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid Unicode (a lone surrogate)") from None
