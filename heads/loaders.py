"""Read training data files: CSV with a header row, or JSON Lines — uploads and CLI files alike.

One path for both (:func:`parse_examples` takes an upload's bytes, :func:`load_examples` reads
a file's bytes and calls the same code), so the same file gives the same Examples and the same
``training_data_hash`` whichever way it arrives:

    bytes -> UTF-8, a leading BOM (as Excel writes, even twice) dropped; bytes that are not
             UTF-8 are kept as escapes so the row that holds them can be named; a UTF-16 file is
             refused with what to do
          -> line ends CRLF and CR read as LF (also inside quoted CSV cells)
          -> rows: CSV via the csv module, the first header cell matched after trimming
             whitespace and a BOM; JSONL one object per line (blank lines skipped)
          -> each cell: invalid UTF-8 bytes refused, then text via ``parse_text`` (lone
             surrogates from "\\ud83d" escapes refused) and the label via one ``LabelReader``
             (the label rule of ``headfleet.heads.labels``; merged spellings kept for
             ``validate``'s warnings)

Every problem is a TrainingDataError that names the file and position — ``<file> row N
(line L)`` — and, for a missing column, the columns that are there, because the usual cause is
a header spelled differently than the caller assumed. Row numbers are 1-based data rows (CSV:
the header is not counted), matching the rows ``validate`` names; line numbers are 1-based lines
of the file (a row's first line).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from headfleet.errors import TrainingDataError
from headfleet.heads.examples import Examples, parse_text
from headfleet.heads.labels import LabelReader
from headfleet.text import is_blank

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")

#: what ``errors="surrogateescape"`` makes of a byte that is not UTF-8: U+DC80..U+DCFF
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def load_examples(
    path: str | Path,
    text_col: str = "text",
    label_col: str = "label",
    multi_label: bool = False,
) -> Examples:
    """Load ``path`` (.csv or .jsonl) into Examples. Multi-label: a JSON array, a list literal
    ("['a', 'b']" or '["a", "b"]') or "a|b" per cell."""
    path = Path(path)
    suffix = _suffix(path.name)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise TrainingDataError(f"{path}: no such file") from None
    except OSError as e:
        raise TrainingDataError(f"{path}: cannot be read ({e.strerror or e})") from None
    return _parse(path.name, suffix, content, text_col, label_col, multi_label)


def parse_examples(
    name: str,
    content: bytes,
    text_col: str = "text",
    label_col: str = "label",
    multi_label: bool = False,
) -> Examples:
    """Examples from an uploaded file's bytes; ``name``'s suffix says the format, as for a path."""
    return _parse(name, _suffix(name), content, text_col, label_col, multi_label)


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise TrainingDataError(
            f"{name}: unsupported file type {suffix or '(none)'}; use .csv (with a header row) or .jsonl"
        )
    return suffix


def _parse(name: str, suffix: str, content: bytes, text_col: str, label_col: str, multi_label: bool) -> Examples:
    text = _decode(name, content)
    reader = LabelReader(multi_label)
    read = _read_csv if suffix in CSV_SUFFIXES else _read_jsonl
    texts, labels = read(name, text, text_col, label_col, reader)
    return Examples(texts=texts, labels=labels, multi_label=multi_label, label_spellings=reader.merged())


def _decode(name: str, content: bytes) -> str:
    """UTF-8 with BOMs dropped and line ends as LF; undecodable bytes kept as U+DC80..U+DCFF."""
    if content.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise TrainingDataError(f"{name}: the file is UTF-16 (it starts with a UTF-16 BOM); re-save it as UTF-8")
    text = content.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


#: How each entry point names the columns to read, for the message that says a column is missing.
_COLUMN_OPTIONS = "CLI: --text-col / --label-col; HTTP: text_col / label_col"


def _refuse_bad_bytes(cells: list[str] | str, where: str) -> None:
    for cell in [cells] if isinstance(cells, str) else cells:
        m = _ESCAPED_BYTE.search(cell)
        if m:
            raise TrainingDataError(
                f"{where}: not valid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02X}); re-save the file as UTF-8"
            )


def _read_csv(
    name: str, content: str, text_col: str, label_col: str, reader: LabelReader
) -> tuple[list[str], list[Any]]:
    # newline="": only line ends end a line (all "\n" by now), so U+2028 inside a text stays in its cell.
    rows = csv.reader(io.StringIO(content, newline=""))
    has_bad_bytes = _ESCAPED_BYTE.search(content) is not None
    try:
        header = next(rows, None)
        if header is None:
            raise TrainingDataError(f"{name}: the file is empty; expected a header row with {text_col!r} and {label_col!r}")
        if has_bad_bytes:
            _refuse_bad_bytes(header, f"{name} header (line 1)")
        header = [h.strip().strip("\ufeff").strip() for h in header]
        missing = [c for c in (text_col, label_col) if c not in header]
        if missing:
            raise TrainingDataError(
                f"{name}: no column {' or '.join(repr(c) for c in missing)}; columns present: {header}. "
                f"Rename the header, or name your columns ({_COLUMN_OPTIONS})."
            )
        ti, li = header.index(text_col), header.index(label_col)
        texts: list[str] = []
        labels: list[Any] = []
        line = rows.line_num + 1  # where the next row starts
        for row in rows:
            where = f"{name} row {len(texts) + 1} (line {line})"
            line = rows.line_num + 1
            if has_bad_bytes:
                _refuse_bad_bytes(row, where)
            if not row or all(is_blank(cell) for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise TrainingDataError(
                    f"{where}: {len(row)} cells but the header has {len(header)}; quote cells that contain commas"
                )
            texts.append(parse_text(row[ti], where))
            labels.append(reader.read(row[li], where))
    except csv.Error as e:
        raise TrainingDataError(f"{name} line {rows.line_num}: malformed CSV ({e})") from None
    return texts, labels


def _read_jsonl(
    name: str, content: str, text_col: str, label_col: str, reader: LabelReader
) -> tuple[list[str], list[Any]]:
    texts: list[str] = []
    labels: list[Any] = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows raw in strings.
    for line_no, line in enumerate(content.split("\n"), start=1):
        where = f"{name} row {len(texts) + 1} (line {line_no})"
        _refuse_bad_bytes(line, where)
        line = line.lstrip("\ufeff")  # a BOM inside the file, left where two files were joined
        if is_blank(line):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{where}: invalid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting too deep
            raise TrainingDataError(f"{where}: invalid JSON ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(record, dict):
            raise TrainingDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [c for c in (text_col, label_col) if c not in record]
        if missing:
            raise TrainingDataError(
                f"{where}: no key {' or '.join(repr(c) for c in missing)}; keys present: {sorted(record)}. "
                f"Name your keys ({_COLUMN_OPTIONS})."
            )
        texts.append(parse_text(record[text_col], where))
        labels.append(reader.read(record[label_col], where))
    return texts, labels
