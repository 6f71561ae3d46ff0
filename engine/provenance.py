"""What a saved artefact records about the code and libraries that made it."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
import subprocess
from pathlib import Path

import headfleet

_LIBRARIES = ("torch", "transformers", "tokenizers", "scikit-learn", "numpy", "faiss-cpu", "safetensors")
# the packages a fit's numbers depend on (the embeddings, the solvers, the LoRA optimiser)
NUMERIC_LIBRARIES = ("torch", "numpy", "scikit-learn", "scipy", "transformers", "tokenizers", "onnxruntime")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"headfleet": headfleet.__version__}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def environment() -> dict:
    """The installed Python environment, so a later refit can tell whether it runs in the same one.

    ``{"lock": sha256 hex, "distributions": int, "numerics": {name: version}}``. ``lock`` hashes
    the sorted ``name==version`` lines of every installed distribution (names lower-cased, ``_``
    and ``.`` as ``-``), so any package added, removed or changed changes it; ``numerics`` names
    the versions of :data:`NUMERIC_LIBRARIES` that are installed, and headfleet's. Read once per
    process (installing packages into a running service is not supported anyway); a fresh copy
    each call, so a caller may change it."""
    lock, n, numerics = _environment()
    return {"lock": lock, "distributions": n, "numerics": dict(numerics)}


@functools.lru_cache(maxsize=1)
def _environment() -> tuple[str, int, dict[str, str]]:
    lines = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if name:
            lines.add(f"{re.sub(r'[-_.]+', '-', name).lower()}=={dist.version}")
    lock = hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()
    numerics = {"headfleet": headfleet.__version__}
    for name in NUMERIC_LIBRARIES:
        try:
            numerics[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return lock, len(lines), numerics


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the headfleet checkout when it runs from one (editable install), else None."""
    here = Path(headfleet.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
