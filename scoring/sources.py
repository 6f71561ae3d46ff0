"""Document stores, read streaming: JSONL, CSV and Parquet files (or folders of them), SQLite tables.

A store is a sorted list of files; each file is read in row order, never whole. Every row is
``(pos, id, text, reject)``: ``pos`` the row's place in its file (JSONL: line index; CSV: record
index; Parquet, SQLite: row index), ``reject`` None for a good row or ``{"reason", ...}`` for a bad
one (missing or empty text, missing id, undecodable bytes, a line that is not JSON). Bad rows are
rows too: they keep their place, so a chunk of rows ``[k*n, (k+1)*n)`` of a file is the same chunk
in every run, which is what makes a job resumable exactly once.

:class:`Source` finds the files and their kind (by suffix; SQLite also by its magic bytes) and
hands each kind to its reader, one module per kind with the same three calls (``check`` at
open, ``rows`` per file, ``count_rows`` where metadata knows it):

    store_jsonl    a line reader (pyarrow's JSON reader fails a whole block on one bad line)
    store_csv      pyarrow's streaming CSV reader, text read as bytes (so one undecodable row is
                   one reject, not a failed block), malformed records skipped by an invalid-row
                   handler and counted
    store_parquet  ``pyarrow.parquet`` (column projection, batch streaming)
    store_sqlite   ``sqlite3`` with ``text_factory=bytes``, ordered by ``rowid``

and every reader gives each raw row to :func:`~headfleet.scoring.rows.check_row`, the one rule
for what a row must be (:mod:`headfleet.scoring.rows`): JSONL and CSV may start with a UTF-8 BOM
and end lines in CRLF; a text (or id) holding a lone surrogate is a reject, and so is a text with
no visible content.

Every file is opened through a :class:`~headfleet.scoring.confined.Root` (the readers get the
opened file object, SQLite the verified real path): in the service a store's files, and every
folder and symlink on the way to them, must resolve inside the tenant's folder when they are
opened, at submit and again each time the job reads them. A folder source lists its files by
walking descriptors: symlinks (to files or folders) that stay inside the root are followed, one
that leads outside is refused with the whole store (403), a folder reached twice (a link loop)
is refused (422), names starting with ``.`` or ``_`` are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from headfleet.errors import NotFoundError, ValidationError
from headfleet.scoring import store_csv, store_jsonl, store_parquet, store_sqlite
from headfleet.scoring.confined import Root
from headfleet.scoring.paths import refusing
from headfleet.scoring.rows import Row, check_row, printable
from headfleet.scoring.store_sqlite import SQLITE_MAGIC

__all__ = ["KINDS", "SUFFIXES", "Row", "Source", "SourceSpec", "check_row", "printable"]

KINDS = ("jsonl", "csv", "parquet", "sqlite")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}
_STORES = {"jsonl": store_jsonl, "csv": store_csv, "parquet": store_parquet, "sqlite": store_sqlite}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What to read: a path (file or folder), the id and text columns, the SQLite table."""

    path: str
    id_col: str = "id"
    text_col: str = "text"
    table: str | None = None  # SQLite only; None: the database's only table

    def to_dict(self) -> dict:
        """The spec as a JSON-able dict (what the checkpoint records)."""
        return dataclasses.asdict(self)


class Source:
    """A store opened for reading. ``files`` are sorted; ``id_type`` is ``"int64"`` or ``"string"``.

    ``root``: the folder every file must resolve inside when it is opened (None: anywhere)."""

    def __init__(self, spec: SourceSpec, root: Root | str | Path | None = None):
        self.spec = spec
        self.fs = root if isinstance(root, Root) else Root(root)
        top = Path(spec.path)
        with refusing(f"source {spec.path!r}"):
            st = self.fs.stat(top)
        if not spec.id_col or not spec.text_col:
            raise ValidationError("the id and text column names must not be empty")
        if spec.id_col == spec.text_col:
            raise ValidationError(f"the id and text columns are both {spec.id_col!r}; name two different columns")
        self.is_folder = stat.S_ISDIR(st.st_mode)
        if self.is_folder:
            found = self._list_folder(top)
            kinds = {k for k, _ in found}
            if not found:
                raise ValidationError(f"folder {spec.path!r} holds no .jsonl, .csv or .parquet files")
            if len(kinds) > 1:
                raise ValidationError(f"folder {spec.path!r} mixes {', '.join(sorted(kinds))} files; "
                                      "a store is one format")
            self.kind = kinds.pop()
            self.files = sorted(p for _, p in found)
        else:
            if not stat.S_ISREG(st.st_mode):
                raise ValidationError(f"source {spec.path!r} is not a regular file or a folder")
            kind = self._kind_of(top)
            if kind is None:
                raise ValidationError(f"cannot tell the format of {spec.path!r}: expected .jsonl/.ndjson, .csv, "
                                      ".parquet or an SQLite database")
            self.kind, self.files = kind, [top]
        if spec.table is not None and self.kind != "sqlite":
            raise ValidationError("a table names an SQLite table; this source is " + self.kind)
        self.root = top
        self.table: str | None = None
        self.id_type = "string"
        _STORES[self.kind].check(self)  # the columns, once; the id type (and the SQLite table)

    def _list_folder(self, top: Path) -> list[tuple[str, Path]]:
        """Every store file under ``top``, walked through descriptors beneath the root: a symlink that
        leaves the root is refused, one that stays inside is followed, a folder reached twice is refused."""
        found: list[tuple[str, Path]] = []
        seen: set[tuple[int, int]] = set()

        def visit(folder: Path, st: os.stat_result) -> None:
            if (st.st_dev, st.st_ino) in seen:
                raise ValidationError(f"folder {str(folder)!r} is reached twice through symbolic links (a loop, or "
                                      "two links to one folder); a store lists each file once")
            seen.add((st.st_dev, st.st_ino))
            with refusing(f"folder {str(folder)!r}"):
                names = self.fs.listdir(folder)
            for name in names:
                if name.startswith((".", "_")):  # _SUCCESS, _metadata, temp files
                    continue
                p = folder / name
                kind = SUFFIXES.get(p.suffix.lower())
                try:
                    with refusing(f"source file {str(p)!r}"):
                        est = self.fs.stat(p)
                except NotFoundError:
                    if kind is None or kind == "sqlite":
                        continue  # a dangling link that would not be read anyway
                    raise
                if stat.S_ISDIR(est.st_mode):
                    visit(p, est)
                elif kind is not None and kind != "sqlite":
                    if not stat.S_ISREG(est.st_mode):
                        raise ValidationError(f"source file {str(p)!r} is not a regular file")
                    found.append((kind, p))

        with refusing(f"source {str(top)!r}"):
            visit(top, self.fs.stat(top))
        return found

    def file(self, path: Path, buffering: int = -1) -> BinaryIO:
        """One of the store's files, opened beneath the root for binary reading (what every reader gets
        instead of the path). A path failure is the domain's error naming ``path`` (see ``refusing``)."""
        with refusing(f"source file {str(path)!r}"):
            return self.fs.file(path, buffering)

    def _kind_of(self, path: Path) -> str | None:
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None or kind == "sqlite":
            with self.file(path) as f:
                if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                    return "sqlite"
            return None if kind == "sqlite" else kind
        return kind

    def require_columns(self, where: Path, columns: list[str]) -> None:
        """Refuse (``ValidationError``, naming ``where`` and the flag to pass) ``columns`` that lack the id
        or the text column."""
        for what, col in (("id", self.spec.id_col), ("text", self.spec.text_col)):
            if col not in columns:
                flag = "--id-col" if what == "id" else "--text-col"
                raise ValidationError(f"{where}: no {what} column {col!r} (columns: {', '.join(columns)}); "
                                      f"name it with {flag}")

    # -- shipping to a Ray worker: what was checked at open travels, nothing is opened again ----------
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- what a job records about the store ---------------------------------------------------------
    def identity(self) -> dict:
        """Enough to tell, at resume, that the store is the one the job started on."""
        h = hashlib.sha256()
        for p in self.files:
            with refusing(f"source file {str(p)!r}"):
                st = self.fs.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return {"path": printable(os.path.realpath(self.root)), "kind": self.kind, "files": len(self.files),
                "table": self.table, "id_col": self.spec.id_col, "text_col": self.spec.text_col,
                "files_sha256": h.hexdigest()}

    def estimate_rows(self) -> tuple[int, bool]:
        """(rows, exact): Parquet and SQLite from metadata; JSONL and CSV by counting line ends
        (a CSV record with newlines inside quotes counts more than once; huge files are sampled)."""
        if self.kind in ("parquet", "sqlite"):
            return _STORES[self.kind].count_rows(self), True
        total = 0
        for p in self.files:
            with self.file(p) as f:
                total += max(0, _count_lines(f) - (1 if self.kind == "csv" else 0))
        return total, False

    # -- reading ------------------------------------------------------------------------------------
    def rows(self, file_index: int, start: int = 0, batch_rows: int = 4096) -> Iterator[Row]:
        """The rows of one file (``files[file_index]``) from position ``start`` on, as :data:`Row` tuples
        ``(pos, id, text, reject)``; ``batch_rows``: how many the Parquet and SQLite readers fetch at once."""
        path = self.files[file_index]
        return _STORES[self.kind].rows(self, path, start, batch_rows)


def _count_lines(f: BinaryIO, sample_over: int = 256 << 20) -> int:
    """Line ends in the open file ``f`` (one more when the last line has none); huge files are sampled."""
    size = os.fstat(f.fileno()).st_size
    if size <= sample_over:
        n = 0
        last = b""
        while block := f.read(1 << 22):
            n += block.count(b"\n")
            last = block[-1:]
        return n + (1 if size and last != b"\n" else 0)
    sample = f.read(4 << 20)
    return int(size * max(1, sample.count(b"\n")) / max(1, len(sample)))
