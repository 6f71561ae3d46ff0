"""JSONL stores (``.jsonl``, ``.ndjson``, ``.json``): one JSON object a line, read by a line reader.

The guarantee: one bad line is one reject, never a failed block (pyarrow's JSON reader fails a
whole block on one bad line, so it is not used). How it is kept, per line (``pos``: its index):

    a UTF-8 BOM before the first line    -> dropped (not part of the first record)
    pos < start, or a blank line         -> skipped (done before, or not a document)
    undecodable bytes                    -> reject "undecodable bytes"
    msgspec refuses it                   -> the standard library reads it (a lone surrogate escape
                                            ``"\\ud83d"`` is JSON msgspec refuses), else reject "invalid JSON"
    not an object                        -> reject "not a JSON object"
    else                                 -> check_row(id column, text column), ids as strings

Schemaless: there is nothing to check when the store is opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import msgspec

from headfleet.scoring.rows import Row, check_row, raw

if TYPE_CHECKING:
    from headfleet.scoring.sources import Source

BOM = b"\xef\xbb\xbf"


def check(src: Source) -> None:
    """Nothing to check at open: a row without the columns is a reject; ids are written as strings."""


def rows(src: Source, path: Path, start: int, batch_rows: int) -> Iterator[Row]:
    """The rows of the JSONL file ``path`` from line index ``start`` on (``batch_rows``: unused, lines stream)."""
    decode = msgspec.json.decode
    id_col, text_col = src.spec.id_col, src.spec.text_col
    with src.file(path, buffering=1 << 20) as f:
        for pos, line in enumerate(f):
            if pos == 0 and line.startswith(BOM):
                line = line[len(BOM):]  # a UTF-8 byte order mark is not part of the first record
            if pos < start or not line.strip():
                continue  # done before, or a blank line (not a document)
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield pos, None, None, {"reason": "undecodable bytes", "detail": str(exc), "line": pos + 1,
                                        "raw": raw(line.rstrip(b"\r\n"))}
                continue
            try:
                obj = decode(s)
            except msgspec.DecodeError as exc:
                obj = _lenient_json(s)
                if obj is None:
                    yield pos, None, None, {"reason": "invalid JSON", "detail": str(exc), "line": pos + 1,
                                            "raw": raw(s.rstrip("\r\n"))}
                    continue
            if not isinstance(obj, dict):
                yield pos, None, None, {"reason": "not a JSON object", "line": pos + 1, "raw": raw(s.rstrip())}
                continue
            yield check_row(pos, obj.get(id_col), obj.get(text_col), "string", line=pos + 1)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _lenient_json(s: str) -> Any:
    """msgspec refuses a lone surrogate escape (``"\\ud83d"``) like broken JSON; the standard library
    reads it, so check_row can reject the row for what it is. None: not JSON after all."""
    try:
        return json.loads(s, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
