"""Document stores, read streaming: JSONL, CSV and Parquet files (or folders of them), SQLite tables.

A store is a sorted list of files; each file is read in row order, never whole. Every row is
``(pos, id, text, reject)``: ``pos`` the row's place in its file (JSONL: line index; CSV: record
index; Parquet, SQLite: row index), ``reject`` None for a good row or ``{"reason", ...}`` for a bad
one (missing or empty text, missing id, undecodable bytes, a line that is not JSON). Bad rows are
rows too: they keep their place, so a chunk of rows ``[k*n, (k+1)*n)`` of a file is the same chunk
in every run, which is what makes a job resumable exactly once.

Parquet goes through ``pyarrow.dataset`` (column projection, batch streaming); CSV through
pyarrow's streaming CSV reader with the text read as bytes (so one undecodable row is one
reject, not a failed block) and malformed records skipped by an invalid-row handler and counted;
JSONL through a line reader (pyarrow's JSON reader fails a whole block on one bad line);
SQLite through ``sqlite3`` with ``text_factory=bytes``, ordered by ``rowid``.

Every file is opened through a :class:`~headfleet.scoring.confined.Root` (the readers get the
opened file object, SQLite the verified real path): in the service a store's files, and every
folder and symlink on the way to them, must resolve inside the tenant's folder when they are
opened, at submit and again each time the job reads them. A folder source lists its files by
walking descriptors: symlinks (to files or folders) that stay inside the root are followed, one
that leads outside is refused with the whole store (403), a folder reached twice (a link loop)
is refused (422), names starting with ``.`` or ``_`` are skipped.

What a row must be: JSONL and CSV may start with a UTF-8 BOM and end lines in CRLF; a text (or
id) holding a lone surrogate is a reject ("text is not valid Unicode (lone surrogate)": JSON can
spell one as ``"\\ud83d"``), and so is a text with no visible content (``headfleet.text.is_blank``:
only whitespace is "empty text", only zero-width or format characters is "no visible content").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import msgspec

from headfleet.errors import NotFoundError, ValidationError
from headfleet.scoring.confined import Root, refusing
from headfleet.text import is_blank

KINDS = ("jsonl", "csv", "parquet", "sqlite")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}
SQLITE_MAGIC = b"SQLite format 3\x00"
RAW_CHARS = 300  # how much of a bad row the rejects file keeps
BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")

Row = tuple  # (pos, id, text or None, reject dict or None)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What to read: a path (file or folder), the id and text columns, the SQLite table."""

    path: str
    id_col: str = "id"
    text_col: str = "text"
    table: str | None = None  # SQLite only; None: the database's only table

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _raw(value: Any) -> str:
    """A bad row as the rejects file shows it: undecodable bytes and lone surrogates escaped, clipped."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="backslashreplace")
    elif isinstance(value, str):
        value = value.encode("utf-8", errors="backslashreplace").decode("utf-8")
    else:
        value = repr(value)
    return value if len(value) <= RAW_CHARS else value[:RAW_CHARS] + "…"


def printable(value: str) -> str:
    """A name for a message or a rejects record: a non-UTF-8 file name's bytes escaped, not a crash later."""
    return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace") \
        if _SURROGATE.search(value) else value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _lenient_json(s: str) -> Any:
    """msgspec refuses a lone surrogate escape (``"\\ud83d"``) like broken JSON; the standard library
    reads it, so check_row can reject the row for what it is. None: not JSON after all."""
    try:
        return json.loads(s, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None


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
        getattr(self, f"_open_{self.kind}")()

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

    def _file(self, path: Path, buffering: int = -1) -> BinaryIO:
        """One of the store's files, opened beneath the root (what every reader gets instead of the path)."""
        with refusing(f"source file {str(path)!r}"):
            return self.fs.file(path, buffering)

    def _kind_of(self, path: Path) -> str | None:
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None or kind == "sqlite":
            with self._file(path) as f:
                if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                    return "sqlite"
            return None if kind == "sqlite" else kind
        return kind

    # -- opening: check the columns once, decide the id type -----------------------------------------
    def _open_jsonl(self) -> None:
        pass  # schemaless: a row without the columns is a reject; ids are written as strings

    def _open_csv(self) -> None:
        import pyarrow.csv as pcsv

        for path in self.files:
            with self._file(path) as f:
                try:
                    reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 16, use_threads=False),
                                           parse_options=pcsv.ParseOptions(newlines_in_values=True,
                                                                           invalid_row_handler=lambda row: "skip"))
                    columns = reader.schema.names
                except Exception as exc:  # pyarrow's error names the problem; we name the file
                    raise ValidationError(f"{path}: not a readable CSV file ({exc})") from None
            self._require_columns(path, columns)

    def _open_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = None
        for path in self.files:  # every file's footer: a file without the columns is refused now, not mid-job
            with self._file(path) as f:
                try:
                    file_schema = pq.ParquetFile(f).schema_arrow
                except Exception as exc:
                    raise ValidationError(f"{path}: not a readable Parquet file ({exc})") from None
            self._require_columns(path, file_schema.names)
            schema = schema or file_schema
        if pa.types.is_integer(schema.field(self.spec.id_col).type):
            self.id_type = "int64"
        ttype = schema.field(self.spec.text_col).type
        if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype) or pa.types.is_binary(ttype)
                or pa.types.is_large_binary(ttype) or pa.types.is_string_view(ttype)):
            raise ValidationError(f"column {self.spec.text_col!r} of {self.spec.path!r} is {ttype}, not text")

    def _open_sqlite(self) -> None:
        try:
            self._check_sqlite()
        except sqlite3.DatabaseError as exc:  # a damaged file: the user's to fix, not a server error
            raise ValidationError(f"{self.spec.path!r}: not a readable SQLite database ({exc})") from None

    def _check_sqlite(self) -> None:
        with contextlib.closing(self._connect()) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
                "ORDER BY name")]
            table = self.spec.table
            if table is None:
                if len(tables) != 1:
                    raise ValidationError(f"{self.spec.path!r} holds {len(tables)} tables ({', '.join(tables) or '-'}); "
                                          "name one with --table")
                table = tables[0]
            elif table not in tables:
                raise NotFoundError(f"{self.spec.path!r} has no table {table!r} (tables: {', '.join(tables) or '-'})")
            info = {r[1]: (r[2] or "").upper() for r in conn.execute(f"PRAGMA table_info({_quote(table)})")}
        self.table = table
        self._require_columns(self.root, list(info))
        if "INT" in info[self.spec.id_col]:  # SQLite's integer affinity
            self.id_type = "int64"

    def _require_columns(self, where: Path, columns: list[str]) -> None:
        for what, col in (("id", self.spec.id_col), ("text", self.spec.text_col)):
            if col not in columns:
                flag = "--id-col" if what == "id" else "--text-col"
                raise ValidationError(f"{where}: no {what} column {col!r} (columns: {', '.join(columns)}); "
                                      f"name it with {flag}")

    def _connect(self, rows: bool = False):
        with refusing(f"source file {str(self.files[0])!r}"):
            conn = self.fs.connect_sqlite(self.files[0])  # the verified file's real path, and a check SQLite holds it
        if rows:
            conn.text_factory = bytes  # undecodable text is one row's problem, not the query's
        return conn

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
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            total = 0
            for p in self.files:
                with self._file(p) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            return total, True
        if self.kind == "sqlite":
            with contextlib.closing(self._connect()) as conn:
                return int(conn.execute(f"SELECT COUNT(*) FROM {_quote(self.table)}").fetchone()[0]), True
        total = 0
        for p in self.files:
            with self._file(p) as f:
                total += max(0, _count_lines(f) - (1 if self.kind == "csv" else 0))
        return total, False

    # -- reading ------------------------------------------------------------------------------------
    def rows(self, file_index: int, start: int = 0, batch_rows: int = 4096) -> Iterator[Row]:
        """The rows of one file from position ``start`` on."""
        path = self.files[file_index]
        return getattr(self, f"_rows_{self.kind}")(path, start, batch_rows)

    def _rows_jsonl(self, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
        decode = msgspec.json.decode
        id_col, text_col = self.spec.id_col, self.spec.text_col
        with self._file(path, buffering=1 << 20) as f:
            for pos, line in enumerate(f):
                if pos == 0 and line.startswith(BOM):
                    line = line[len(BOM):]  # a UTF-8 byte order mark is not part of the first record
                if pos < start or not line.strip():
                    continue  # done before, or a blank line (not a document)
                try:
                    s = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield pos, None, None, {"reason": "undecodable bytes", "detail": str(exc), "line": pos + 1,
                                            "raw": _raw(line.rstrip(b"\r\n"))}
                    continue
                try:
                    obj = decode(s)
                except msgspec.DecodeError as exc:
                    obj = _lenient_json(s)
                    if obj is None:
                        yield pos, None, None, {"reason": "invalid JSON", "detail": str(exc), "line": pos + 1,
                                                "raw": _raw(s.rstrip("\r\n"))}
                        continue
                if not isinstance(obj, dict):
                    yield pos, None, None, {"reason": "not a JSON object", "line": pos + 1, "raw": _raw(s.rstrip())}
                    continue
                yield check_row(pos, obj.get(id_col), obj.get(text_col), "string", line=pos + 1)

    def _rows_csv(self, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        malformed: list[dict] = []

        def on_invalid(row) -> str:
            malformed.append({"reason": "malformed CSV record",
                              "detail": f"{row.actual_columns} fields where the header has {row.expected_columns}",
                              **({"line": row.number} if row.number and row.number > 0 else {}),
                              "raw": _raw(row.text)})
            return "skip"

        id_col, text_col = self.spec.id_col, self.spec.text_col
        with self._file(path) as f:  # pyarrow skips a UTF-8 BOM and reads CRLF line ends
            reader = pcsv.open_csv(
                f, read_options=pcsv.ReadOptions(block_size=1 << 20, use_threads=False),
                parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
                convert_options=pcsv.ConvertOptions(column_types={id_col: pa.binary(), text_col: pa.binary()},
                                                    include_columns=[id_col, text_col], strings_can_be_null=False))
            pos = 0
            for batch in reader:
                # records the parser skipped in this block take the place of the block's first record,
                # so they fall into the same chunk in every run
                while malformed:
                    reject = malformed.pop(0)
                    if pos >= start:
                        yield pos, None, None, reject
                ids = batch.column(id_col).to_pylist()
                texts = batch.column(text_col).to_pylist()
                for i in range(len(ids)):
                    if pos + i >= start:
                        yield check_row(pos + i, ids[i], texts[i], "string")
                pos += len(ids)
        for reject in malformed:
            if pos >= start:
                yield pos, None, None, reject

    def _rows_parquet(self, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
        import pyarrow.parquet as pq

        id_type = self.id_type
        pos = 0
        with self._file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows,
                                                        columns=[self.spec.id_col, self.spec.text_col]):
                n = batch.num_rows
                if pos + n <= start:
                    pos += n
                    continue
                skip = max(0, start - pos)
                ids = _as_bytes(batch.column(self.spec.id_col).slice(skip)).to_pylist()
                texts = _as_bytes(batch.column(self.spec.text_col).slice(skip)).to_pylist()
                for i in range(len(ids)):
                    yield check_row(pos + skip + i, ids[i], texts[i], id_type)
                pos += n

    def _rows_sqlite(self, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
        cols = f"{_quote(self.spec.id_col)}, {_quote(self.spec.text_col)}"
        table = _quote(self.table)
        conn = self._connect(rows=True)
        try:
            try:
                cur = conn.execute(f"SELECT {cols} FROM {table} ORDER BY rowid LIMIT -1 OFFSET ?", (start,))
            except sqlite3.OperationalError:  # a WITHOUT ROWID table or a view: its id orders it
                cur = conn.execute(f"SELECT {cols} FROM {table} ORDER BY {_quote(self.spec.id_col)} "
                                   "LIMIT -1 OFFSET ?", (start,))
            pos = start
            while True:
                rows = cur.fetchmany(batch_rows)
                if not rows:
                    return
                for doc_id, text in rows:
                    yield check_row(pos, doc_id, text, self.id_type)
                    pos += 1
        finally:
            conn.close()


def _as_bytes(column):
    """A string column as bytes: check_row decodes each value, so bad UTF-8 is one row's reject."""
    import pyarrow as pa

    t = column.type
    try:
        if pa.types.is_string(t):
            return column.cast(pa.binary())
        if pa.types.is_large_string(t):
            return column.cast(pa.large_binary())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    return column


def check_row(pos: int, doc_id: Any, text: Any, id_type: str, **where: Any) -> Row:
    """One raw row -> ``(pos, id, text, None)`` or ``(pos, id-or-None, None, reject)``."""
    doc_id, id_problem = _check_id(doc_id, id_type)
    if id_problem is not None:
        return pos, None, None, {"reason": id_problem, **where, "raw": _raw(doc_id) if doc_id is not None else None}
    if text is None:
        return pos, doc_id, None, {"reason": "missing text", "id": doc_id, **where}
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            return pos, doc_id, None, {"reason": "undecodable bytes", "detail": str(exc), "id": doc_id, **where,
                                       "raw": _raw(text)}
    if not isinstance(text, str):
        return pos, doc_id, None, {"reason": "text is not a string", "id": doc_id, **where, "raw": _raw(text)}
    if _SURROGATE.search(text):  # no UTF-8 spells it: it would fail later, hashing or writing the text
        return pos, doc_id, None, {"reason": "text is not valid Unicode (lone surrogate)", "id": doc_id, **where,
                                   "raw": _raw(text)}
    if not text.strip():
        return pos, doc_id, None, {"reason": "empty text", "id": doc_id, **where}
    if is_blank(text):  # zero-width spaces, joiners, a BOM...: the tokenizer would see an empty text
        shown = ", ".join(dict.fromkeys(f"U+{ord(c):04X}" for c in text if not c.isspace()))
        return pos, doc_id, None, {"reason": "no visible content", "detail": f"only invisible characters ({shown})",
                                   "id": doc_id, **where}
    return pos, doc_id, text, None


def _check_id(doc_id: Any, id_type: str) -> tuple[Any, str | None]:
    if doc_id is None:
        return None, "missing id"
    if isinstance(doc_id, (bytes, bytearray)):
        try:
            doc_id = bytes(doc_id).decode("utf-8")
        except UnicodeDecodeError:
            return doc_id, "undecodable bytes in id"
    if isinstance(doc_id, bool):
        return doc_id, "id is not a string or an integer"
    if isinstance(doc_id, str) and _SURROGATE.search(doc_id):
        return doc_id, "id is not valid Unicode (lone surrogate)"
    if id_type == "int64":
        if isinstance(doc_id, int):
            return doc_id, None
        if isinstance(doc_id, str) and doc_id.strip().lstrip("-").isdigit():
            return int(doc_id), None
        return doc_id, "id is not an integer"
    if isinstance(doc_id, (int, float)):
        return str(doc_id), None
    if not isinstance(doc_id, str):
        return doc_id, "id is not a string or an integer"
    if not doc_id.strip():
        return None, "missing id"
    return doc_id, None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
