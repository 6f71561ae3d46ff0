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
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import msgspec

from headfleet.errors import NotFoundError, ValidationError

KINDS = ("jsonl", "csv", "parquet", "sqlite")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}
SQLITE_MAGIC = b"SQLite format 3\x00"
RAW_CHARS = 300  # how much of a bad row the rejects file keeps

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


def _kind_of(path: Path) -> str | None:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None or kind == "sqlite":
        try:
            with open(path, "rb") as f:
                if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                    return "sqlite"
        except OSError:
            return None
        return None if kind == "sqlite" else kind
    return kind


def _raw(value: Any) -> str:
    """A bad row as the rejects file shows it: undecodable bytes escaped, clipped."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="backslashreplace")
    elif not isinstance(value, str):
        value = repr(value)
    return value if len(value) <= RAW_CHARS else value[:RAW_CHARS] + "…"


class Source:
    """A store opened for reading. ``files`` are sorted; ``id_type`` is ``"int64"`` or ``"string"``."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        root = Path(spec.path)
        if not root.exists():
            raise NotFoundError(f"source {spec.path!r} does not exist")
        if not spec.id_col or not spec.text_col:
            raise ValidationError("the id and text column names must not be empty")
        if spec.id_col == spec.text_col:
            raise ValidationError(f"the id and text columns are both {spec.id_col!r}; name two different columns")
        if root.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
                for name in filenames:
                    if name.startswith((".", "_")):  # _SUCCESS, _metadata, temp files
                        continue
                    p = Path(dirpath) / name
                    kind = SUFFIXES.get(p.suffix.lower())
                    if kind is not None and kind != "sqlite":
                        found.append((kind, p))
            kinds = {k for k, _ in found}
            if not found:
                raise ValidationError(f"folder {spec.path!r} holds no .jsonl, .csv or .parquet files")
            if len(kinds) > 1:
                raise ValidationError(f"folder {spec.path!r} mixes {', '.join(sorted(kinds))} files; "
                                      "a store is one format")
            self.kind = kinds.pop()
            self.files = sorted(p for _, p in found)
        else:
            kind = _kind_of(root)
            if kind is None:
                raise ValidationError(f"cannot tell the format of {spec.path!r}: expected .jsonl/.ndjson, .csv, "
                                      ".parquet or an SQLite database")
            self.kind, self.files = kind, [root]
        if spec.table is not None and self.kind != "sqlite":
            raise ValidationError("a table names an SQLite table; this source is " + self.kind)
        self.root = root
        self.table: str | None = None
        self.id_type = "string"
        getattr(self, f"_open_{self.kind}")()

    # -- opening: check the columns once, decide the id type -----------------------------------------
    def _open_jsonl(self) -> None:
        pass  # schemaless: a row without the columns is a reject; ids are written as strings

    def _open_csv(self) -> None:
        import pyarrow.csv as pcsv

        for path in self.files:
            try:
                reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16, use_threads=False),
                                       parse_options=pcsv.ParseOptions(newlines_in_values=True,
                                                                       invalid_row_handler=lambda row: "skip"))
                columns = reader.schema.names
            except Exception as exc:  # pyarrow's error names the problem; we name the file
                raise ValidationError(f"{path}: not a readable CSV file ({exc})") from None
            self._require_columns(path, columns)

    def _open_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.dataset as ds

        try:
            self._dataset = ds.dataset([str(p) for p in self.files], format="parquet")
        except Exception as exc:
            raise ValidationError(f"{self.spec.path}: not a readable Parquet store ({exc})") from None
        schema = self._dataset.schema
        self._require_columns(self.root, schema.names)
        if pa.types.is_integer(schema.field(self.spec.id_col).type):
            self.id_type = "int64"
        ttype = schema.field(self.spec.text_col).type
        if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype) or pa.types.is_binary(ttype)
                or pa.types.is_large_binary(ttype) or pa.types.is_string_view(ttype)):
            raise ValidationError(f"column {self.spec.text_col!r} of {self.spec.path!r} is {ttype}, not text")

    def _open_sqlite(self) -> None:
        with self._connect() as conn:
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

    def _connect(self, rows: bool = False) -> sqlite3.Connection:
        uri = Path(self.files[0]).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
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
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"path": str(self.root.resolve()), "kind": self.kind, "files": len(self.files), "table": self.table,
                "id_col": self.spec.id_col, "text_col": self.spec.text_col, "files_sha256": h.hexdigest()}

    def estimate_rows(self) -> tuple[int, bool]:
        """(rows, exact): Parquet and SQLite from metadata; JSONL and CSV by counting line ends
        (a CSV record with newlines inside quotes counts more than once; huge files are sampled)."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files), True
        if self.kind == "sqlite":
            with self._connect() as conn:
                return int(conn.execute(f"SELECT COUNT(*) FROM {_quote(self.table)}").fetchone()[0]), True
        total = 0
        for p in self.files:
            total += max(0, _count_lines(p) - (1 if self.kind == "csv" else 0))
        return total, False

    # -- reading ------------------------------------------------------------------------------------
    def rows(self, file_index: int, start: int = 0, batch_rows: int = 4096) -> Iterator[Row]:
        """The rows of one file from position ``start`` on."""
        path = self.files[file_index]
        return getattr(self, f"_rows_{self.kind}")(path, start, batch_rows)

    def _rows_jsonl(self, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
        decode = msgspec.json.decode
        id_col, text_col = self.spec.id_col, self.spec.text_col
        with open(path, "rb", buffering=1 << 20) as f:
            for pos, line in enumerate(f):
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
        reader = pcsv.open_csv(
            path, read_options=pcsv.ReadOptions(block_size=1 << 20, use_threads=False),
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
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows,
                                                       columns=[self.spec.id_col, self.spec.text_col]):
            n = batch.num_rows
            if pos + n <= start:
                pos += n
                continue
            skip = max(0, start - pos)
            ids = batch.column(self.spec.id_col).slice(skip).to_pylist()
            texts = batch.column(self.spec.text_col).slice(skip).to_pylist()
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
    if not text.strip():
        return pos, doc_id, None, {"reason": "empty text", "id": doc_id, **where}
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


def _count_lines(path: Path, sample_over: int = 256 << 20) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= sample_over:
            n = 0
            while block := f.read(1 << 22):
                n += block.count(b"\n")
            return n + (1 if size and not _ends_with_newline(path) else 0)
        sample = f.read(4 << 20)
    return int(size * max(1, sample.count(b"\n")) / max(1, len(sample)))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
