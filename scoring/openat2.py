"""The kernel's resolver: ``openat2(root, rel, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` (Linux >= 5.6).

The guarantee: the descriptor returned was resolved by the kernel beneath ``root_fd`` — every
component, symlinks included, in one syscall, so no check-then-open race is left. How it is kept:

    how = open_how(flags, mode if the call creates else 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    repeat up to 16 times:
        fd = syscall(SYS_openat2, root_fd, rel or ".", &how, sizeof how)
        fd >= 0 -> fd;  EAGAIN (a rename raced a '..') -> again;  else -> OSError(errno)
    16 EAGAINs -> Retried (the caller falls back to the walk)

A path that leaves the root is the kernel's ``EXDEV``; whether ``ENOSYS``/``EPERM`` mean "no
openat2 here" (an old kernel, a seccomp filter) is for :func:`probe` to tell. Deciding between
this and the walk is :func:`headfleet.scoring.confined.open_beneath`'s job, not this module's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from headfleet.scoring.paths import O_CLOEXEC, O_PATH

_SYS_OPENAT2 = 437  # the same number on every architecture Linux added it to (5.6)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Retried(Exception):
    """The kernel kept answering EAGAIN (renames racing the resolution): use the walk instead."""


@functools.cache
def _libc_syscall():
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    return fn


def _call(root_fd: int, raw: bytes, how: _OpenHow) -> int:
    return _libc_syscall()(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), ctypes.c_char_p(raw),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))


def open_beneath(root_fd: int, raw: bytes, flags: int, mode: int) -> int:
    """``raw`` (an encoded relative path; empty: the root itself) opened beneath the directory ``root_fd``
    with ``flags`` (``mode`` only when they create a file). Returns the new descriptor.

    Raises ``OSError`` with the kernel's errno (``EXDEV``: the path leaves the root; ``ENOSYS`` or
    ``EPERM``: maybe no openat2 here, see :func:`probe`) and :class:`Retried` after 16 EAGAINs.
    """
    tmpfile = getattr(os, "O_TMPFILE", 0)
    creates = flags & os.O_CREAT or (tmpfile and flags & tmpfile == tmpfile)
    how = _OpenHow(flags, mode if creates else 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)  # openat2: no stray mode
    for _ in range(16):  # EAGAIN: a rename raced a '..' in the walk; the kernel asks us to retry
        fd = _call(root_fd, raw or b".", how)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            continue
        raise OSError(err, os.strerror(err), os.fsdecode(raw))
    raise Retried


def probe(root_fd: int) -> bool:
    """Does openat2 work here at all (an old kernel says ENOSYS, a seccomp filter often EPERM)?
    ``root_fd``: any open directory; nothing beneath it is touched (``O_PATH`` of ``.``)."""
    fd = _call(root_fd, b".", _OpenHow(O_PATH | O_CLOEXEC, 0, _RESOLVE_BENEATH))
    if fd >= 0:
        os.close(fd)
    return fd >= 0
