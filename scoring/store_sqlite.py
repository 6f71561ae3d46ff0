"""SQLite stores: one table (or view) of a database, read through ``sqlite3`` in ``rowid`` order.

The guarantee: SQLite reads only the file that was opened and verified beneath the root, and
undecodable text is one row's reject, not a failed query. How it is kept:

    connect:  Root.connect_sqlite -> the verified descriptor's real path, read-only, kept only if
              SQLite then holds that very file (see :mod:`headfleet.scoring.confined`);
              ``text_factory=bytes`` when reading rows (check_row decodes each value)
    open:     the table named, or the database's only one; its id and text columns must exist;
              an INTEGER-affinity id column makes the id type int64; a damaged file -> ValidationError
    rows:     SELECT id, text ORDER BY rowid LIMIT -1 OFFSET start (a WITHOUT ROWID table or a view:
              ORDER BY its id), fetched ``batch_rows`` at a time
    count:    SELECT COUNT(*) (exact)

Names are always quoted (:func:`quote`), never formatted into SQL bare.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from headfleet.errors import NotFoundError, ValidationError
from headfleet.scoring.paths import refusing
from headfleet.scoring.rows import Row, check_row

if TYPE_CHECKING:
    from headfleet.scoring.sources import Source

SQLITE_MAGIC = b"SQLite format 3\x00"


def check(src: Source) -> None:
    """Pick the table (``src.spec.table`` or the only one) into ``src.table``, require its columns and set
    ``src.id_type``. Raises ``ValidationError`` (damaged file, no single table, missing column) or
    ``NotFoundError`` (no such table)."""
    try:
        _check(src)
    except sqlite3.DatabaseError as exc:  # a damaged file: the user's to fix, not a server error
        raise ValidationError(f"{src.spec.path!r}: not a readable SQLite database ({exc})") from None


def _check(src: Source) -> None:
    with contextlib.closing(connect(src)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        table = src.spec.table
        if table is None:
            if len(tables) != 1:
                raise ValidationError(f"{src.spec.path!r} holds {len(tables)} tables ({', '.join(tables) or '-'}); "
                                      "name one with --table")
            table = tables[0]
        elif table not in tables:
            raise NotFoundError(f"{src.spec.path!r} has no table {table!r} (tables: {', '.join(tables) or '-'})")
        info = {r[1]: (r[2] or "").upper() for r in conn.execute(f"PRAGMA table_info({quote(table)})")}
    src.table = table
    src.require_columns(src.root, list(info))
    if "INT" in info[src.spec.id_col]:  # SQLite's integer affinity
        src.id_type = "int64"


def connect(src: Source, rows: bool = False) -> sqlite3.Connection:
    """A read-only connection to the store's database (its one file), verified beneath the root; with
    ``rows``, text comes back as bytes. Path failures are the domain's errors (see ``refusing``)."""
    with refusing(f"source file {str(src.files[0])!r}"):
        conn = src.fs.connect_sqlite(src.files[0])  # the verified file's real path, and a check SQLite holds it
    if rows:
        conn.text_factory = bytes  # undecodable text is one row's problem, not the query's
    return conn


def rows(src: Source, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
    """The rows of the store's table from row index ``start`` on, fetched ``batch_rows`` at a time
    (``path``: the database, which is ``src.files[0]``)."""
    cols = f"{quote(src.spec.id_col)}, {quote(src.spec.text_col)}"
    table = quote(src.table)
    conn = connect(src, rows=True)
    try:
        try:
            cur = conn.execute(f"SELECT {cols} FROM {table} ORDER BY rowid LIMIT -1 OFFSET ?", (start,))
        except sqlite3.OperationalError:  # a WITHOUT ROWID table or a view: its id orders it
            cur = conn.execute(f"SELECT {cols} FROM {table} ORDER BY {quote(src.spec.id_col)} "
                               "LIMIT -1 OFFSET ?", (start,))
        pos = start
        while True:
            batch = cur.fetchmany(batch_rows)
            if not batch:
                return
            for doc_id, text in batch:
                yield check_row(pos, doc_id, text, src.id_type)
                pos += 1
    finally:
        conn.close()


def count_rows(src: Source) -> int:
    """Rows in the store's table (``SELECT COUNT(*)``, exact)."""
    with contextlib.closing(connect(src)) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {quote(src.table)}").fetchone()[0])


def quote(name: str) -> str:
    """An SQL identifier, double-quoted (inner quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'
