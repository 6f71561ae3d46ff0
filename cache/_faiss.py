"""``faiss``, imported with its loader's INFO lines off.

The wheel tries its AVX-512 and AVX2 builds first and logs a ``ModuleNotFoundError`` at INFO for
each one it does not ship before loading the generic build; at the service's INFO level those
lines read like failures at every start. Warnings and errors of the loader still show.
"""

from __future__ import annotations

import logging

_loader = logging.getLogger("faiss.loader")
if _loader.level == logging.NOTSET:  # an operator who set its level (DEBUG, say) keeps theirs
    _loader.setLevel(logging.WARNING)

import faiss  # noqa: E402  (after the logger's level is set)

__all__ = ["faiss"]
