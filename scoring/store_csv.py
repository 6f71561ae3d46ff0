"""CSV stores: pyarrow's streaming CSV reader, the id and text columns read as bytes.

The guarantee: one bad record is one reject in a stable place, never a failed block. How it is kept:

    open:  every file's header read once; a file without the id or text column is refused now
    rows:  the two columns as binary (undecodable bytes are check_row's reject, not the block's);
           a malformed record (fields != header's) is skipped by the invalid-row handler and
           becomes a reject "malformed CSV record" at the position of the next block's first
           record, so it falls into the same chunk in every run

pyarrow skips a UTF-8 BOM, reads CRLF line ends and newlines inside quoted values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from headfleet.errors import ValidationError
from headfleet.scoring.rows import Row, check_row, raw

if TYPE_CHECKING:
    from headfleet.scoring.sources import Source


def check(src: Source) -> None:
    """Every file's header: refuses (``ValidationError``) a file pyarrow cannot read as CSV or one
    without the id or text column."""
    import pyarrow.csv as pcsv

    for path in src.files:
        with src.file(path) as f:
            try:
                reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 16, use_threads=False),
                                       parse_options=pcsv.ParseOptions(newlines_in_values=True,
                                                                       invalid_row_handler=lambda row: "skip"))
                columns = reader.schema.names
            except Exception as exc:  # pyarrow's error names the problem; we name the file
                raise ValidationError(f"{path}: not a readable CSV file ({exc})") from None
        src.require_columns(path, columns)


def rows(src: Source, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
    """The rows of the CSV file ``path`` from record index ``start`` on (blocks of 1 MiB; ``batch_rows`` unused)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    malformed: list[dict] = []

    def on_invalid(row) -> str:
        malformed.append({"reason": "malformed CSV record",
                          "detail": f"{row.actual_columns} fields where the header has {row.expected_columns}",
                          **({"line": row.number} if row.number and row.number > 0 else {}),
                          "raw": raw(row.text)})
        return "skip"

    id_col, text_col = src.spec.id_col, src.spec.text_col
    with src.file(path) as f:  # pyarrow skips a UTF-8 BOM and reads CRLF line ends
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
