"""The in-process pipeline every caller shares (see ``engine.py``)."""

from headfleet.engine.engine import Engine
from headfleet.engine.types import ADAPTER_NS, EmbedBatch, Filled, Prepared, Resolved

__all__ = ["ADAPTER_NS", "EmbedBatch", "Engine", "Filled", "Prepared", "Resolved"]
