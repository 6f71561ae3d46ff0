"""Labelled training examples in memory, with a content hash for manifests.

``source_hash`` is the sha256 of a canonical JSON form of (multi_label, texts, labels), not of
the file bytes: the same data from a CSV or a JSONL file, or in memory, gets the same hash, so
a manifest's ``training_data_hash`` says "trained on exactly this data" whatever the format.
Multi-label label sets are stored sorted and de-duplicated for the same reason.

Labels reach ``Examples`` already canonical (one rule, in ``headfleet.heads.labels``, applied by
every reader: :func:`examples_from_records` here, the CSV/JSONL readers in ``loaders``);
``label_spellings`` keeps the labels that were written more than one way, for ``validate``'s
warnings. Texts and labels are valid Unicode: a lone surrogate is refused naming its row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from headfleet.errors import TrainingDataError
from headfleet.heads.labels import LabelReader, refuse_lone_surrogate


@dataclass
class Examples:
    """Texts with their labels; ``labels[i]`` is a str (single-label) or a sorted list[str]."""

    texts: list[str]
    labels: list[str] | list[list[str]]
    multi_label: bool
    source_hash: str = field(default="")
    #: label -> the spellings that became it, for labels written two or more ways ("1", "1.0")
    label_spellings: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise TrainingDataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if not self.source_hash:
            try:
                self.source_hash = content_hash(self.texts, self.labels, self.multi_label)
            except UnicodeEncodeError:
                _refuse_unencodable(self.texts, self.labels, "training data")
                raise

    def __len__(self) -> int:
        return len(self.texts)

    def classes(self) -> list[str]:
        """Every label that occurs, sorted (the order sklearn's ``classes_`` uses)."""
        if self.multi_label:
            return sorted({label for row in self.labels for label in row})
        return sorted(set(self.labels))

    def targets(self) -> np.ndarray:
        """The labels as numbers over :meth:`classes`: single-label [n] int64 class indices,
        multi-label [n, L] int64 0/1 indicators (row i, column j: example i has class j)."""
        classes = self.classes()
        index = {c: i for i, c in enumerate(classes)}
        if self.multi_label:
            Y = np.zeros((len(self), len(classes)), dtype=np.int64)
            for i, row in enumerate(self.labels):
                Y[i, [index[c] for c in row]] = 1
            return Y
        return np.array([index[c] for c in self.labels], dtype=np.int64)


def content_hash(texts: Sequence[str], labels: Sequence[Any], multi_label: bool) -> str:
    """sha256 of the canonical JSON of the data; stable across file formats."""
    canonical = json.dumps(
        {"multi_label": bool(multi_label), "texts": list(texts), "labels": list(labels)},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _refuse_unencodable(texts: Sequence[str], labels: Sequence[Any], where: str, first_line: int = 0) -> None:
    """TrainingDataError naming the first row whose text or label holds a lone surrogate."""
    for i, (text, label) in enumerate(zip(texts, labels), start=1):
        row = f"{where} row {i}" + (f" (line {first_line + i - 1})" if first_line else "")
        if isinstance(text, str):
            refuse_lone_surrogate(text, row, "the text")
        for name in label if isinstance(label, (list, tuple)) else [label]:
            if isinstance(name, str):
                refuse_lone_surrogate(name, row, "the label")


def parse_label(value: Any, multi_label: bool, where: str) -> str | list[str]:
    """One label cell -> its canonical str, or a sorted label set for multi-label data.

    The rule is :func:`headfleet.heads.labels.canonical_label` (numbers by value, true/false in
    lower case, list-shaped labels only for multi-label data). A missing single label is kept as
    "" so ``validate`` can name every such row; a missing multi-label cell is the empty set (no
    label applies), which is legitimate. To learn which spellings were merged, read a whole data
    set with one :class:`~headfleet.heads.labels.LabelReader` instead.
    """
    return LabelReader(multi_label).read(value, where)


def parse_text(value: Any, where: str) -> str:
    """A text cell must be a string; null becomes "" so ``validate`` reports it with its row.

    A lone surrogate (a "\\ud83d" escape without its partner) is refused here, naming ``where``:
    it cannot be hashed, stored or tokenised as UTF-8.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TrainingDataError(f"{where}: text must be a string, got {type(value).__name__} {value!r}")
    refuse_lone_surrogate(value, where, "the text")
    return value


def examples_from_records(
    records: Iterable[dict[str, Any]] | Iterable[tuple[str, Any]],
    text_col: str = "text",
    label_col: str = "label",
    multi_label: bool = False,
) -> Examples:
    """In-memory data: dicts with ``text_col``/``label_col`` keys, or (text, label) pairs.

    Labels are read by the one rule (``headfleet.heads.labels``); rows are named ``record i``,
    1-based, in every refusal."""
    texts: list[str] = []
    labels: list[Any] = []
    reader = LabelReader(multi_label)
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
        labels.append(reader.read(label, where))
    return Examples(texts=texts, labels=labels, multi_label=multi_label, label_spellings=reader.merged())


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
    _refuse_unencodable(texts, labels, where, first_line=2)  # line 1 is the header
    examples = Examples(texts=texts, labels=labels, multi_label=multi)
    if examples.source_hash != recorded:
        raise TrainingDataError(f"{where} does not match its recorded hash (altered or damaged)")
    return examples
