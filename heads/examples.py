"""Labelled training examples in memory, with a content hash for manifests.

``source_hash`` is the sha256 of a canonical JSON form of (multi_label, texts, labels), not of
the file bytes: the same data from a CSV or a JSONL file, or in memory, gets the same hash, so
a manifest's ``training_data_hash`` says "trained on exactly this data" whatever the format.
Multi-label label sets are stored sorted and de-duplicated for the same reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from headfleet.errors import TrainingDataError

LABEL_SEPARATOR = "|"


@dataclass
class Examples:
    """Texts with their labels; ``labels[i]`` is a str (single-label) or a sorted list[str]."""

    texts: list[str]
    labels: list[str] | list[list[str]]
    multi_label: bool
    source_hash: str = field(default="")

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise TrainingDataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if not self.source_hash:
            self.source_hash = content_hash(self.texts, self.labels, self.multi_label)

    def __len__(self) -> int:
        return len(self.texts)

    def classes(self) -> list[str]:
        """Every label that occurs, sorted (the order sklearn's ``classes_`` uses)."""
        if self.multi_label:
            return sorted({label for row in self.labels for label in row})
        return sorted(set(self.labels))


def content_hash(texts: Sequence[str], labels: Sequence[Any], multi_label: bool) -> str:
    """sha256 of the canonical JSON of the data; stable across file formats."""
    canonical = json.dumps(
        {"multi_label": bool(multi_label), "texts": list(texts), "labels": list(labels)},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_label(value: Any, multi_label: bool, where: str) -> str | list[str]:
    """One label cell -> str, or a sorted label set for multi-label data.

    Multi-label cells may be a list, or a string "a|b"; an empty cell or null is the empty set
    (no label applies), which is legitimate for multi-label data. Single-label cells must be a
    scalar; an empty one is kept as "" so ``validate`` can name the row.
    """
    if multi_label:
        if value is None:
            return []
        if isinstance(value, str):
            parts = value.split(LABEL_SEPARATOR)
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise TrainingDataError(f"{where}: a multi-label cell must be a list or 'a|b', got {value!r}")
        out: set[str] = set()
        for part in parts:
            if not isinstance(part, (str, int)) or isinstance(part, bool):
                raise TrainingDataError(f"{where}: labels must be strings, got {part!r}")
            name = str(part).strip()
            if name:
                out.add(name)
        return sorted(out)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        raise TrainingDataError(
            f"{where}: got a list label {value!r} for single-label data; pass multi_label=True"
        )
    return str(value).strip()


def parse_text(value: Any, where: str) -> str:
    """A text cell must be a string; null becomes "" so ``validate`` reports it with its row."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TrainingDataError(f"{where}: text must be a string, got {type(value).__name__} {value!r}")
    return value


def examples_from_records(
    records: Iterable[dict[str, Any]] | Iterable[tuple[str, Any]],
    text_col: str = "text",
    label_col: str = "label",
    multi_label: bool = False,
) -> Examples:
    """In-memory data: dicts with ``text_col``/``label_col`` keys, or (text, label) pairs."""
    texts: list[str] = []
    labels: list[Any] = []
    for i, record in enumerate(records, start=1):
        where = f"record {i}"
        if isinstance(record, dict):
            missing = [c for c in (text_col, label_col) if c not in record]
            if missing:
                raise TrainingDataError(
                    f"{where} has no {' or '.join(repr(c) for c in missing)} key; "
                    f"keys present: {sorted(record)}"
                )
            text, label = record[text_col], record[label_col]
        elif isinstance(record, (tuple, list)) and len(record) == 2:
            text, label = record
        else:
            raise TrainingDataError(f"{where}: expected a dict or a (text, label) pair, got {record!r}")
        texts.append(parse_text(text, where))
        labels.append(parse_label(label, multi_label, where))
    return Examples(texts=texts, labels=labels, multi_label=multi_label)


# -- stored with a version: gzipped JSON Lines -----------------------------------------------------
TRAINING_DATA_FILE = "training_data.jsonl.gz"
_FORMAT = "headfleet.training_data"
_FORMAT_VERSION = 1


def examples_to_bytes(examples: Examples) -> bytes:
    """Gzipped JSON Lines: a header line, then one ``{"text", "label"}`` (or ``"labels"``) per example.

    The header names the format, the count and ``training_data_hash``, so a reader can tell a
    complete, unaltered file from anything else. ``mtime=0``: the same data gives the same bytes.
    """
    import gzip

    key = "labels" if examples.multi_label else "label"
    lines = [json.dumps({"format": _FORMAT, "version": _FORMAT_VERSION, "multi_label": examples.multi_label,
                         "n": len(examples), "training_data_hash": examples.source_hash})]
    lines += [json.dumps({"text": t, key: lab}, ensure_ascii=False) for t, lab in zip(examples.texts, examples.labels)]
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=6, mtime=0)


def examples_from_bytes(data: bytes, where: str = "stored training data") -> Examples:
    """The inverse of :meth:`examples_to_bytes`; TrainingDataError if the file is not whole or was altered."""
    import gzip
    import zlib

    try:
        # split on "\n" only: JSON escapes it inside strings, but not U+2028 and the like,
        # which str.splitlines would also split on
        lines = gzip.decompress(data).decode("utf-8").rstrip("\n").split("\n")
        header = json.loads(lines[0])
        if header.get("format") != _FORMAT or header.get("version") != _FORMAT_VERSION:
            raise ValueError(f"not {_FORMAT} version {_FORMAT_VERSION}")
        multi, n, recorded = bool(header["multi_label"]), int(header["n"]), str(header["training_data_hash"])
        key = "labels" if multi else "label"
        rows = [json.loads(line) for line in lines[1:]]
        texts = [r["text"] for r in rows]
        labels = [list(r[key]) if multi else r[key] for r in rows]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise TrainingDataError(f"{where} is unreadable: {type(e).__name__}: {e}") from None
    if len(texts) != n:
        raise TrainingDataError(f"{where} holds {len(texts)} examples, its header says {n}")
    examples = Examples(texts=texts, labels=labels, multi_label=multi)
    if examples.source_hash != recorded:
        raise TrainingDataError(f"{where} does not match its recorded hash (altered or damaged)")
    return examples
