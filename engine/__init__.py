"""The in-process pipeline every caller shares (see ``engine.py``)."""

from headfleet.engine.engine import Engine
from headfleet.engine.types import ADAPTER_NS, Answer, Compute, EmbedBatch, EmbedRequest, Filled, Prepared, Resolved, Route, Scored, Choice, SHADOW_REF

__all__ = ["ADAPTER_NS", "Answer", "Compute", "EmbedBatch", "EmbedRequest", "Engine", "Filled", "Prepared", "Resolved", "Route", "Scored", "Choice", "SHADOW_REF"]
