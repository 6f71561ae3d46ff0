"""Backbone loading, fingerprint, tokenisation and the frozen forward. Knows nothing of tenants."""

from headfleet.embedder.backbone import PoolingConfig, default_model_path, fingerprint, tokenizer_hash
from headfleet.embedder.embedder import Embedded, Embedder, TokenCounts

__all__ = ["Embedded", "Embedder", "PoolingConfig", "TokenCounts", "default_model_path", "fingerprint",
           "tokenizer_hash"]
