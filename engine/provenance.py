"""What a saved artefact records about the code and libraries that made it."""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

import headfleet

_LIBRARIES = ("torch", "transformers", "tokenizers", "scikit-learn", "numpy", "faiss-cpu", "safetensors")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"headfleet": headfleet.__version__}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


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
