"""Every file a confined scoring job opens is opened *beneath* one folder; a path that leads out is refused.

The service confines each tenant's jobs to ``<scoring_root>/<tenant>/``: sources (and every file
of a folder source), outputs, rejects, reports, checkpoints and parts are opened only through a
:class:`Root`. The guarantee: the file opened is inside the folder *at the moment it is opened*.
How it is kept:

    anchor = openat(open(folder's parent), folder's name, O_DIRECTORY | O_NOFOLLOW)  # the folder is no symlink
    fd = openat2(anchor, rel, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)              # Linux >= 5.6
    else (no openat2: old kernel, seccomp), the same walk done here, one component at a time:
        fstatat(dir, part, NOFOLLOW): a symlink -> splice its target into what is left
                                      (an absolute target is refused)
        '..'                        -> pop a directory (popping the folder itself is an escape)
        else                        -> openat(dir, part, O_NOFOLLOW): the next dir, or the file
        an escape -> Escape (a ForbiddenError: 403 in the service, naming the path as the tenant gave it)

(:func:`open_beneath` here chooses; the syscall is :mod:`headfleet.scoring.openat2`, the walk
:mod:`headfleet.scoring.walk`, the checks and domain errors they share :mod:`headfleet.scoring.paths`.)

So every component of the path counts (not only the last one, which is all ``O_NOFOLLOW`` guards),
no check-then-open race is left (a symlink swapped in after a job was submitted is refused when
the job opens the file), and the bytes of a file outside the folder are never read. Symlinks that
stay inside the folder are followed; absolute symlinks are refused even when they point inside
(the kernel's rule for ``RESOLVE_BENEATH``). Files are read only if they are regular files
(opened ``O_NONBLOCK``, so a FIFO cannot hang a worker).

Writes (:meth:`Root.write_atomic`) create a temp file ``O_EXCL | O_NOFOLLOW`` in a directory
opened beneath the folder, fsync, and rename it inside that directory: a symlink at the output's
name is replaced, never followed. Folders are created one component at a time the same way, and
removed with ``shutil.rmtree(dir_fd=...)``, which does not follow symlinks.

Readers that only open by path get what was opened: pyarrow gets the file object; ``sqlite3``
(which opens by name, and resolves symlinks itself) gets the real path of the verified
descriptor, and the connection is kept only if SQLite then holds that very file (one more
descriptor of this process on the same device and inode; SQLite reads nothing before the first
statement, so a connection to another file is closed unread). SQLite opens ``-wal`` and
``-journal`` beside that real path itself, with ``O_NOFOLLOW``. Where ``/proc`` is missing, the
real path comes from the walk and that last check is skipped.

``Root(None)`` confines nothing (the command line scores the user's own paths): the same calls,
plain ``open`` underneath. Hard links are not paths: a hard link to a file the service can read
is that file (the operator's ``fs.protected_hardlinks`` is what stops a tenant making one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import threading
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from headfleet.errors import ValidationError
from headfleet.scoring import openat2
from headfleet.scoring.paths import (NAME_MAX, O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, O_PATH, Escape, encode, escape,
                                     path_error, refusing)
from headfleet.scoring.walk import walk

__all__ = ["Escape", "Root", "open_beneath", "path_error", "refusing", "resolve_beneath"]

READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)

_openat2_works: bool | None = None  # None: not probed yet; tests set False to run the walk
_probe_lock = threading.Lock()
_sqlite_lock = threading.Lock()


# -- choosing the resolver -------------------------------------------------------------------------------
def _openat2_probe(root_fd: int) -> bool:
    """Does openat2 work here at all? Asked once per process (:func:`headfleet.scoring.openat2.probe`),
    then remembered in ``_openat2_works``."""
    global _openat2_works
    with _probe_lock:
        if _openat2_works is None:
            _openat2_works = openat2.probe(root_fd)
        return _openat2_works


def open_beneath(root_fd: int, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``rel`` opened beneath the directory ``root_fd`` with ``flags`` (and ``mode`` when they create):
    the new descriptor. Every component, symlinks included, must resolve inside it (:class:`Escape`
    otherwise); other failures are the ``OSError`` the kernel gave. ``openat2`` where it works, else the walk."""
    raw = encode(rel)
    flags |= O_CLOEXEC
    if _openat2_works is not False and O_PATH:
        try:
            return openat2.open_beneath(root_fd, raw, flags, mode)
        except openat2.Retried:
            pass
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM) and not _openat2_probe(root_fd):
                pass  # no openat2 here (old kernel, seccomp): the walk answers
            elif exc.errno == errno.EXDEV:  # RESOLVE_BENEATH's answer to a path that leaves the root
                raise escape(rel) from None
            else:
                raise
    return walk(root_fd, rel, flags, mode)


def resolve_beneath(root_fd: int, rel: str) -> PurePosixPath:
    """The real path of ``rel`` relative to ``root_fd`` (symlinks resolved; missing components kept as given).
    Raises :class:`Escape` for a path that leads out, ``ValidationError`` for one that is not a name."""
    encode(rel)
    return PurePosixPath(*walk(root_fd, rel, 0, 0, resolve_only=True))


# -- the folder a job is confined to ---------------------------------------------------------------------
class Root:
    """The folder every path of a job must resolve inside; ``Root(None)`` confines nothing.

    Holds no descriptor (it travels to Ray workers): each call opens the folder, works beneath it,
    closes. Paths are given as the job names them (absolute, lexically inside the folder, or
    relative to it).
    """

    def __init__(self, folder: str | Path | None):
        self.folder = Path(os.path.abspath(folder)) if folder is not None else None

    def __repr__(self) -> str:
        return f"Root({str(self.folder) if self.folder else None!r})"

    @property
    def confined(self) -> bool:
        """True when there is a folder to confine to (``Root(None)``: False)."""
        return self.folder is not None

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the folder, as given (no symlink resolved): what open_beneath walks."""
        if self.folder is None:
            return str(path)
        p = Path(path)
        if not p.is_absolute():
            return str(p)
        try:
            return str(p.relative_to(self.folder))
        except ValueError:  # named by its last component only: the rest is the server's
            raise Escape(f"{p.name!r} is outside the job's folder", p.name) from None

    def shown(self, path: str | Path) -> str:
        """How a message names ``path``: relative to the folder when confined."""
        return self.rel(path) if self.folder is not None else str(path)

    @contextlib.contextmanager
    def _anchor(self) -> Iterator[int]:
        """A descriptor of the folder itself, which must be a real folder (not a symlink)."""
        parent = os.open(self.folder.parent, (O_PATH or os.O_RDONLY) | O_DIRECTORY | O_CLOEXEC)
        try:
            name = self.folder.name
            if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise Escape("the job's folder is a symbolic link, which is refused (the link could lead "
                             "anywhere); the operator makes it a real folder")
            fd = os.open(name, (O_PATH or os.O_RDONLY) | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            yield fd
        finally:
            os.close(fd)

    def open(self, path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """``os.open(path, flags, mode)`` beneath the folder: the new descriptor (close-on-exec). Raises
        :class:`Escape` for a path that leads out, ``ValidationError`` for one that is not a name, and
        the kernel's ``OSError`` otherwise (see :func:`refusing`)."""
        if self.folder is None:
            encode(str(path))
            return os.open(path, flags | O_CLOEXEC, mode)
        rel = self.rel(path)
        with self._anchor() as anchor:
            return open_beneath(anchor, rel, flags, mode)

    def open_file(self, path: str | Path) -> int:
        """A regular file opened for reading (a FIFO, device or folder is refused, a FIFO without blocking)."""
        fd = self.open(path, READ)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValidationError(f"{self.shown(path)!r} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def file(self, path: str | Path, buffering: int = -1) -> BinaryIO:
        """A regular file, open for binary reading (what pyarrow's readers get instead of the path)."""
        return os.fdopen(self.open_file(path), "rb", buffering=buffering)

    def stat(self, path: str | Path) -> os.stat_result:
        """``path``'s stat, through symlinks that stay inside (no read, no side effect: ``O_PATH``)."""
        fd = self.open(path, O_PATH or READ)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def lookup(self, path: str | Path) -> os.stat_result | None:
        """:meth:`stat`, or None when nothing is there (a dangling link included)."""
        try:
            return self.stat(path)
        except FileNotFoundError:
            return None

    def realpath(self, path: str | Path) -> PurePosixPath:
        """Relative to the folder, with every existing symlink resolved (for comparing two paths)."""
        if self.folder is None:
            return PurePosixPath(os.path.realpath(path))
        rel = self.rel(path)
        with self._anchor() as anchor:
            return resolve_beneath(anchor, rel)

    def opendir(self, path: str | Path, *, create: bool = False) -> int:
        """A folder, open for listing and as a ``dir_fd``; with ``create``, missing folders are made
        one component at a time, each beneath the root."""
        flags = os.O_RDONLY | O_DIRECTORY
        parent = Path(path).parent
        try:
            return self.open(path, flags)
        except FileNotFoundError:
            # the folder itself (or /) missing is not ours to create
            if not create or Path(path) == parent or (self.folder is not None and self.rel(path) in ("", ".")):
                raise
        pfd = self.opendir(parent, create=True)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(Path(path).name, 0o755, dir_fd=pfd)
        finally:
            os.close(pfd)
        return self.open(path, flags)

    def makedirs(self, path: str | Path) -> None:
        """``path`` and every missing folder above it, each created beneath the folder (mode 0o755)."""
        os.close(self.opendir(path, create=True))

    def listdir(self, path: str | Path) -> list[str]:
        """The names in the folder ``path``, sorted (``.`` and ``..`` left out, as ``os.listdir`` does)."""
        fd = self.opendir(path)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def read_bytes(self, path: str | Path) -> bytes:
        """The whole of the regular file ``path`` (see :meth:`file`)."""
        with self.file(path) as f:
            return f.read()

    def write_atomic(self, path: str | Path, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
        """``write(f)`` into a temp file beside ``path``, fsync, rename over ``path``: a reader sees no
        file or a whole one, and a symlink at ``path`` is replaced, not followed."""
        path = Path(path)
        dfd = self.opendir(path.parent, create=True)
        try:
            tmp = f".{path.name[:NAME_MAX - 20]}.{secrets.token_hex(4)}.tmp"  # fits wherever the name fits
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def write_bytes(self, path: str | Path, data: bytes) -> None:
        """``data`` as the whole of ``path``, atomically (see :meth:`write_atomic`)."""
        self.write_atomic(path, lambda f: f.write(data))

    def unlink_in(self, folder: str | Path, names: list[str]) -> None:
        """Remove ``names`` (files) from ``folder``; a symlink is removed, not its target."""
        fd = self.opendir(folder)
        try:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def remove_tree(self, path: str | Path) -> None:
        """Remove ``path`` and what it holds, never following a symlink; nothing there is fine."""
        path = Path(path)
        try:
            dfd = self.opendir(path.parent)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            try:
                st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path.name, dir_fd=dfd, ignore_errors=True)
            else:
                os.unlink(path.name, dir_fd=dfd)
        finally:
            os.close(dfd)

    def real_path_of(self, fd: int, path: str | Path) -> str:
        """The absolute real path of an opened descriptor (for readers that only take a name)."""
        with contextlib.suppress(OSError):
            real = os.readlink(f"/proc/self/fd/{fd}")
            if real.startswith("/") and not real.endswith(" (deleted)"):
                return real
        if self.folder is None:
            return os.path.realpath(path)
        return str(Path(os.path.realpath(self.folder)) / self.realpath(path))

    def connect_sqlite(self, path: str | Path):
        """A read-only ``sqlite3`` connection to ``path``, which must be the file opened (and verified)
        beneath the root: SQLite is given the real path of that descriptor and the connection is kept
        only if SQLite then holds that very file (a component swapped in between is refused)."""
        import sqlite3

        fd = self.open_file(path)
        try:
            st = os.fstat(fd)
            real = self.real_path_of(fd, path)
            if self.folder is not None:
                top = os.path.realpath(self.folder)
                if not (real == top or real.startswith(top.rstrip("/") + "/")):
                    raise escape(self.rel(path))
            with _sqlite_lock:  # this process's other SQLite opens do not move the count meanwhile
                before = _holders(st)
                conn = sqlite3.connect(Path(real).as_uri() + "?mode=ro", uri=True, check_same_thread=False)
                after = _holders(st) if self.folder is not None and before is not None else None
            if after is not None and after <= before:  # SQLite holds another file: close it before any read
                conn.close()
                raise Escape(f"{self.rel(path)!r} changed while it was being opened (a symbolic link "
                             "swapped in?); it was not read")
            return conn
        finally:
            os.close(fd)


def _holders(st: os.stat_result) -> int | None:
    """How many of this process's descriptors are open on the file ``st`` describes (None: no /proc)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    n = 0
    for name in fds:
        try:
            other = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            n += 1
    return n
