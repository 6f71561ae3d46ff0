"""What a row of a store must be: every reader hands each raw row to :func:`check_row`, one rule for all.

A row is a :data:`Row`, ``(pos, id, text, reject)``: ``pos`` its place in its file, ``reject``
None for a good row or ``{"reason", ...}`` for a bad one. The guarantee: a text that reaches
``classify`` is valid Unicode with visible content and has an id of the store's id type; every
other row is kept as a reject in its place (so chunks cut the same in every run), never dropped
and never a failed chunk. How it is kept:

    id:    missing, empty, undecodable bytes, a lone surrogate, a bool, not an integer in an
           int64 store                    -> reject (the id as raw, escaped and clipped)
    text:  missing, undecodable bytes, not a string, a lone surrogate (no UTF-8 spells it: it
           would fail later, hashing or writing it), only whitespace ("empty text"), only
           zero-width or format characters (``headfleet.text.is_blank``: "no visible content")
                                          -> reject, naming the reason (and the text as raw,
                                             except a missing one)
    else                                  -> (pos, id, text, None)

A reject's ``raw`` is at most :data:`RAW_CHARS` characters, undecodable bytes and lone surrogates
escaped (``backslashreplace``), so the rejects file is always valid UTF-8.
"""

from __future__ import annotations

import re
from typing import Any

from headfleet.text import is_blank

RAW_CHARS = 300  # how much of a bad row the rejects file keeps
_SURROGATE = re.compile("[\ud800-\udfff]")

Row = tuple  # (pos, id, text or None, reject dict or None)


def raw(value: Any) -> str:
    """A bad row as the rejects file shows it: undecodable bytes and lone surrogates escaped, clipped to
    :data:`RAW_CHARS` characters (then ``…``); anything but bytes or a string is its ``repr``."""
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


def check_row(pos: int, doc_id: Any, text: Any, id_type: str, **where: Any) -> Row:
    """One raw row -> ``(pos, id, text, None)`` or ``(pos, id-or-None, None, reject)``.

    ``doc_id``/``text``: as the reader got them (str, bytes, int, None, ...); ``id_type``:
    ``"int64"`` or ``"string"``; ``where``: extra fields for the reject (``line=``). Never raises.
    """
    doc_id, id_problem = _check_id(doc_id, id_type)
    if id_problem is not None:
        return pos, None, None, {"reason": id_problem, **where, "raw": raw(doc_id) if doc_id is not None else None}
    if text is None:
        return pos, doc_id, None, {"reason": "missing text", "id": doc_id, **where}
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            return pos, doc_id, None, {"reason": "undecodable bytes", "detail": str(exc), "id": doc_id, **where,
                                       "raw": raw(text)}
    if not isinstance(text, str):
        return pos, doc_id, None, {"reason": "text is not a string", "id": doc_id, **where, "raw": raw(text)}
    if _SURROGATE.search(text):  # no UTF-8 spells it: it would fail later, hashing or writing the text
        return pos, doc_id, None, {"reason": "text is not valid Unicode (lone surrogate)", "id": doc_id, **where,
                                   "raw": raw(text)}
    if not text.strip():
        return pos, doc_id, None, {"reason": "empty text", "id": doc_id, **where, "raw": raw(text)}
    if is_blank(text):  # zero-width spaces, joiners, a BOM...: the tokenizer would see an empty text
        shown = ", ".join(dict.fromkeys(f"U+{ord(c):04X}" for c in text if not c.isspace()))
        return pos, doc_id, None, {"reason": "no visible content", "detail": f"only invisible characters ({shown})",
                                   "id": doc_id, **where, "raw": raw(text)}
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
