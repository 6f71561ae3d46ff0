"""Training data: load it, hold it, check it — one import for callers.

The work lives in three small modules (``examples``: the in-memory form, its hash and the
gzipped JSON Lines file stored beside each head version,
``loaders``: CSV/JSONL files, ``validation``: refusals and warnings); this module is the
stable name the service and the CLI import from.
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
from headfleet.heads.loaders import load_examples
from headfleet.heads.validation import TokenStats, ValidationReport, validate

__all__ = [
    "TRAINING_DATA_FILE",
    "Examples",
    "TokenStats",
    "ValidationReport",
    "content_hash",
    "examples_from_bytes",
    "examples_from_records",
    "examples_to_bytes",
    "load_examples",
    "validate",
]
