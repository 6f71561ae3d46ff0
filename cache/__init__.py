"""Embedding cache: content keys, the memory / local FAISS / Redis tiers, hit accounting.

The cache knows nothing of what a vector means; it maps a content key (backbone fingerprint,
namespace, max length, normalised text) to a float32 vector, and counts who hit what.
"""

from headfleet.names import MISS, TIER_NAMES

from .base import CORRUPT, Tier
from .faiss_store import FaissStore
from .keys import content_key, normalise_text
from .memory import MemoryLRU
from .redis_tier import RedisTier
from .stats import CacheStats
from .tiered import Lookup, TieredCache

__all__ = [
    "CORRUPT",
    "CacheStats",
    "MISS",
    "TIER_NAMES",
    "FaissStore",
    "Lookup",
    "MemoryLRU",
    "RedisTier",
    "Tier",
    "TieredCache",
    "content_key",
    "normalise_text",
]
