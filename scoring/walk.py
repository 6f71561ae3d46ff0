"""The resolver used where the kernel has no ``openat2`` (old kernel, seccomp): the same rule, walked here.

The guarantee is ``RESOLVE_BENEATH``'s: what is opened lies beneath ``root_fd``, every component
counted, symlinks included. How it is kept — one component at a time, each opened relative to
the directory descriptor before it, so no component is looked up by a path that could change:

    todo = rel's components; stack = [dup(root_fd)]
    for part in todo:
        '' or '.'                      -> skip
        '..'                           -> pop a directory (popping the root itself is an escape)
        fstatat(dir, part, NOFOLLOW)
          a symlink                    -> splice its target into todo (absolute: an escape;
                                          more than MAX_LINKS links: ELOOP)
          more components after it     -> push openat(dir, part, O_DIRECTORY | O_NOFOLLOW)
          the last one                 -> openat(dir, part, flags | O_NOFOLLOW), refused (ELOOP)
                                          if a symlink was swapped in meanwhile
    an escape -> Escape (see :mod:`headfleet.scoring.paths`)
"""

from __future__ import annotations

import errno
import os
import stat

from headfleet.scoring.paths import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, O_PATH, escape

MAX_LINKS = 40  # symlinks followed in one path, as the kernel does


def walk(root_fd: int, rel: str, flags: int, mode: int, *, resolve_only: bool = False):
    """``rel`` beneath the directory ``root_fd``, one component at a time, every symlink spliced in here.

    Returns the descriptor opened with ``flags``/``mode`` (``O_CREAT`` creates only the last
    component), or with ``resolve_only`` the canonical components as a list of names (those that
    exist, then the rest as given). Raises :class:`~headfleet.scoring.paths.Escape` for a path that
    leads out, ``OSError(ELOOP)`` past ``MAX_LINKS`` symlinks or for a symlink swapped in at the last
    component, and the kernel's ``OSError`` otherwise (``FileNotFoundError`` for a missing component).
    """
    todo = list(reversed(rel.split("/")))
    stack = [os.dup(root_fd)]  # the directories of the path so far; stack[0] is the folder
    names: list[str] = []
    links = 0
    try:
        while True:
            if not todo:
                if resolve_only:
                    return names
                return os.open(".", flags, mode, dir_fd=stack[-1])
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) == 1:
                    raise escape(rel)
                os.close(stack.pop())
                names.pop()
                continue
            try:
                st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if resolve_only:
                    rest = [p for p in reversed(todo) if p not in ("", ".")]
                    if ".." in rest:
                        raise
                    return names + [part] + rest
                if todo or not flags & os.O_CREAT:
                    raise
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    raise escape(rel)
                todo.extend(reversed(target.split("/")))
                continue
            if todo:
                stack.append(os.open(part, (O_PATH or os.O_RDONLY) | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
                                     dir_fd=stack[-1]))
                names.append(part)
                continue
            if resolve_only:
                return names + [part]
            fd = os.open(part, flags | O_NOFOLLOW, mode, dir_fd=stack[-1])
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH | O_NOFOLLOW opens a link swapped in meanwhile
                os.close(fd)
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
            return fd
    finally:
        for fd in stack:
            os.close(fd)
