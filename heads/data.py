"""Training data: load it, hold it, check it — one import for callers.

The work lives in three small modules (``examples``: the in-memory form and its hash,
``loaders``: CSV/JSONL files, ``validation``: refusals and warnings); this module is the
stable name the service and the CLI import from.
"""

from __future__ import annotations

from headfleet.heads.examples import Examples, content_hash, examples_from_records
from headfleet.heads.loaders import load_examples
from headfleet.heads.validation import TokenStats, ValidationReport, validate

__all__ = [
    "Examples",
    "TokenStats",
    "ValidationReport",
    "content_hash",
    "examples_from_records",
    "load_examples",
    "validate",
]
