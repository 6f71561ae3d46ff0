"""Parquet stores (``.parquet``, ``.pq``): the two columns read in batches, every footer checked at open.

The guarantee: a file without the columns (or a text column that is not text) is refused when the
store is opened, not mid-job; undecodable UTF-8 in a row is that row's reject. How it is kept:

    open:  every file's footer -> require the id and text columns; the first file's schema gives
           the id type (an integer column: int64, else string) and must have a string or binary text
    rows:  ParquetFile.iter_batches(columns=[id, text]); batches wholly before ``start`` skipped,
           the one holding it sliced; string columns cast to binary so check_row decodes each value
    count: the footers' row counts (exact)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from headfleet.errors import ValidationError
from headfleet.scoring.rows import Row, check_row

if TYPE_CHECKING:
    from headfleet.scoring.sources import Source


def check(src: Source) -> None:
    """Every file's footer: refuses (``ValidationError``) an unreadable file, one without the id or text
    column, or a text column that is not string or binary; sets ``src.id_type`` to ``"int64"`` for an
    integer id column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = None
    for path in src.files:  # every file's footer: a file without the columns is refused now, not mid-job
        with src.file(path) as f:
            try:
                file_schema = pq.ParquetFile(f).schema_arrow
            except Exception as exc:
                raise ValidationError(f"{path}: not a readable Parquet file ({exc})") from None
        src.require_columns(path, file_schema.names)
        schema = schema or file_schema
    if pa.types.is_integer(schema.field(src.spec.id_col).type):
        src.id_type = "int64"
    ttype = schema.field(src.spec.text_col).type
    if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype) or pa.types.is_binary(ttype)
            or pa.types.is_large_binary(ttype) or pa.types.is_string_view(ttype)):
        raise ValidationError(f"column {src.spec.text_col!r} of {src.spec.path!r} is {ttype}, not text")


def rows(src: Source, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
    """The rows of the Parquet file ``path`` from row index ``start`` on, read ``batch_rows`` at a time."""
    import pyarrow.parquet as pq

    id_type = src.id_type
    pos = 0
    with src.file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows,
                                                    columns=[src.spec.id_col, src.spec.text_col]):
            n = batch.num_rows
            if pos + n <= start:
                pos += n
                continue
            skip = max(0, start - pos)
            ids = _as_bytes(batch.column(src.spec.id_col).slice(skip)).to_pylist()
            texts = _as_bytes(batch.column(src.spec.text_col).slice(skip)).to_pylist()
            for i in range(len(ids)):
                yield check_row(pos + skip + i, ids[i], texts[i], id_type)
            pos += n


def count_rows(src: Source) -> int:
    """Rows in all the store's files, from their footers (exact)."""
    import pyarrow.parquet as pq

    total = 0
    for p in src.files:
        with src.file(p) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


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
