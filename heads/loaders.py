"""Read training data files: CSV with a header row, or JSON Lines.

Files are read as UTF-8 (a leading BOM, as Excel writes, is accepted). Every problem is a
TrainingDataError that names the file position and, for a missing column, the columns that
are there, because the usual cause is a header spelled differently than the caller assumed.
Row numbers in messages are 1-based data rows (CSV: the header is not counted), matching the
rows ``validate`` names.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from headfleet.errors import TrainingDataError
from headfleet.heads.examples import Examples, parse_label, parse_text

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def load_examples(
    path: str | Path,
    text_col: str = "text",
    label_col: str = "label",
    multi_label: bool = False,
) -> Examples:
    """Load ``path`` (.csv or .jsonl) into Examples. Multi-label: CSV cells "a|b"; JSONL a
    list or "a|b"."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise TrainingDataError(
            f"{path.name}: unsupported file type {suffix or '(none)'}; use .csv (with a header row) or .jsonl"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TrainingDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise TrainingDataError(
            f"{path.name}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        ) from None
    return _parse(path.name, suffix, text, text_col, label_col, multi_label)


def parse_examples(
    name: str,
    content: bytes,
    text_col: str = "text",
    label_col: str = "label",
    multi_label: bool = False,
) -> Examples:
    """Examples from an uploaded file's bytes; ``name``'s suffix says the format, as for a path."""
    suffix = Path(name).suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise TrainingDataError(
            f"{name}: unsupported file type {suffix or '(none)'}; use .csv (with a header row) or .jsonl"
        )
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"{name}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    return _parse(name, suffix, text, text_col, label_col, multi_label)


def _parse(name: str, suffix: str, text: str, text_col: str, label_col: str, multi_label: bool) -> Examples:
    reader = _read_csv if suffix in CSV_SUFFIXES else _read_jsonl
    texts, labels = reader(name, text, text_col, label_col, multi_label)
    return Examples(texts=texts, labels=labels, multi_label=multi_label)


def _read_csv(
    name: str, content: str, text_col: str, label_col: str, multi_label: bool
) -> tuple[list[str], list[Any]]:
    # newline="": only \n / \r / \r\n end a line, so U+2028 inside a text stays in its cell.
    rows = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(rows, None)
        if header is None:
            raise TrainingDataError(f"{name}: the file is empty; expected a header row with {text_col!r} and {label_col!r}")
        header = [h.strip() for h in header]
        missing = [c for c in (text_col, label_col) if c not in header]
        if missing:
            raise TrainingDataError(
                f"{name}: no column {' or '.join(repr(c) for c in missing)}; columns present: {header}. "
                f"Rename the header or pass text_col/label_col."
            )
        ti, li = header.index(text_col), header.index(label_col)
        texts: list[str] = []
        labels: list[Any] = []
        for row in rows:
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            where = f"{name} row {len(texts) + 1}"
            if len(row) != len(header):
                raise TrainingDataError(
                    f"{where} (line {rows.line_num}): {len(row)} cells but the header has {len(header)}; "
                    f"quote cells that contain commas"
                )
            texts.append(parse_text(row[ti], where))
            labels.append(parse_label(row[li], multi_label, where))
    except csv.Error as e:
        raise TrainingDataError(f"{name} line {rows.line_num}: malformed CSV ({e})") from None
    return texts, labels


def _read_jsonl(
    name: str, content: str, text_col: str, label_col: str, multi_label: bool
) -> tuple[list[str], list[Any]]:
    texts: list[str] = []
    labels: list[Any] = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows raw in strings.
    for line_no, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name} row {len(texts) + 1} (line {line_no})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise TrainingDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [c for c in (text_col, label_col) if c not in record]
        if missing:
            raise TrainingDataError(
                f"{where}: no key {' or '.join(repr(c) for c in missing)}; keys present: {sorted(record)}. "
                f"Pass text_col/label_col to match your data."
            )
        texts.append(parse_text(record[text_col], where))
        labels.append(parse_label(record[label_col], multi_label, where))
    return texts, labels
