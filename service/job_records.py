"""Job records on disk, one store for training and scoring jobs.

Layout: ``<data dir>/jobs/<tenant>/<job id>.json``, each replaced atomically (temp file, fsync,
rename), so a crash leaves the previous record or the new one. A tenant's records live under its
own folder only; an unreadable record is skipped with a warning, never fatal at start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from headfleet.atomic import write_json_atomic
from headfleet.errors import HeadfleetError
from headfleet.names import check_name

log = logging.getLogger(__name__)


class JobRecords:
    """``save(tenant, record)`` and ``load(prefix)`` over the jobs folder (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def save(self, tenant: str, record: dict[str, Any]) -> None:
        folder = self.root / check_name(tenant, "tenant")
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{record['id']}.json", record)

    def load(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every readable record whose id starts with ``prefix`` (``job_`` training, ``score_``
        scoring), as ``(tenant, record)``, tenants and ids in sorted order."""
        if not self.root.is_dir():
            return
        for tdir in sorted(self.root.iterdir()):
            try:
                tenant = check_name(tdir.name, "tenant")
            except HeadfleetError:
                continue
            for path in sorted(tdir.glob(f"{prefix}*.json")):
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    log.warning("ignoring unreadable job record %s", path)
                    continue
                if isinstance(record, dict) and "id" in record:
                    yield tenant, record
