"""Training data: load it, hold it, check it — one import for callers.

The work lives in four small modules (``labels``: the one rule that makes a label value a
label string, ``examples``: the in-memory form, its hash and the gzipped JSON Lines file stored
beside each head version, ``loaders``: CSV/JSONL files and uploads, ``validation``: refusals
and warnings); this module is the stable name the service and the CLI import from.
"""

from __future__ import annotations

from headfleet.heads.examples import (
    TRAINING_DATA_FILE,
    Examples,
    content_hash,
    examples_from_bytes,
    examples_from_records,
    examples_to_bytes,
)
from headfleet.heads.labels import LABEL_SEPARATOR, LabelReader, canonical_label, label_set
from headfleet.heads.loaders import load_examples, parse_examples
from headfleet.heads.validation import TokenStats, ValidationReport, validate

__all__ = [
    "LABEL_SEPARATOR",
    "TRAINING_DATA_FILE",
    "Examples",
    "LabelReader",
    "TokenStats",
    "ValidationReport",
    "canonical_label",
    "content_hash",
    "examples_from_bytes",
    "examples_from_records",
    "examples_to_bytes",
    "label_set",
    "load_examples",
    "parse_examples",
    "validate",
]
