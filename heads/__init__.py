"""Heads: small classifiers over frozen sentence embeddings, their training, fleet and registry.

Everything here works on numpy embeddings (float32 [n, d], L2-normalised) handed in by the
caller; nothing imports torch or HTTP code at import time, and of the embedder only LoRA's
torch-free names (``embedder.lora_names``, for the PEFT reader). sklearn is imported only
inside the functions that fit, split or convert, so importing this package is cheap.
"""

from headfleet.heads.data import (
    Examples,
    TokenStats,
    ValidationReport,
    examples_from_records,
    load_examples,
    validate,
)
from headfleet.heads.fleet import FleetOutput, HeadFleet
from headfleet.heads.registry import Registry
from headfleet.heads.train import TrainedHead, train_head
from headfleet.heads.types import HeadArrays

__all__ = [
    "Examples",
    "FleetOutput",
    "HeadArrays",
    "HeadFleet",
    "Registry",
    "TokenStats",
    "TrainedHead",
    "ValidationReport",
    "examples_from_records",
    "load_examples",
    "train_head",
    "validate",
]
