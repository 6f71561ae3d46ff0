"""Recovery at start: what crashed registry writers left behind (see ``Registry.sweep``).

A version is written into a ``.tmp-*`` folder whose writer holds an flock on it, then renamed
into place; a delete renames the classifier to ``.trash-*`` first; an alias update writes a temp
file under the classifier's alias lock. So a ``.tmp-*`` folder nobody holds (and older than a
moment), any ``.trash-*`` folder and an alias temp file whose lock can be taken are leftovers,
and removing them can never disturb a live writer in another process.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from headfleet.atomic import locked
from headfleet.heads.registry import _TMP_PREFIX, _TRASH_PREFIX, ALIASES_FILE, LOCK_FILE
from headfleet.names import NAME_RE


def sweep(root: Path, min_age_s: float) -> int:
    """Remove the leftovers under every tenant of the registry at ``root``; returns how many."""
    removed = 0
    if not root.is_dir():
        return 0
    for tdir in root.iterdir():
        if not tdir.is_dir() or not NAME_RE.match(tdir.name):
            continue
        for entry in list(tdir.iterdir()):
            if entry.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            elif entry.is_dir() and NAME_RE.match(entry.name):
                removed += _sweep_classifier(entry, min_age_s)
    return removed


def _sweep_classifier(cdir: Path, min_age_s: float) -> int:
    removed = 0
    now = time.time()
    for entry in list(cdir.iterdir()):
        if entry.name.startswith(_TRASH_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        elif entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime < min_age_s:
                    continue
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                os.close(fd)
                continue
            try:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            finally:
                os.close(fd)
        elif entry.name.startswith(f".{ALIASES_FILE}.") and entry.name.endswith(".tmp"):
            try:
                with locked(cdir / LOCK_FILE):  # alias writers hold this while their temp file exists
                    os.unlink(entry)
                    removed += 1
            except OSError:
                pass
    return removed
