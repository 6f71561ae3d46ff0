"""LoRA's names and numbers without torch: module names as PEFT and the backbone spell them, and
the scale of an adapter's delta.

Shared by the injection points (``embedder.lora``), LoRA training (``embedder.lora_train``) and
the PEFT file reader (``heads.adapters``), which imports no torch at import time.
"""

from __future__ import annotations

import math
import re

#: what PEFT puts before every module path in a saved adapter
PEFT_PREFIX = "base_model.model."
_LAYER_RE = re.compile(r"(?:^|\.)((?:encoder\.)?layers?\.\d+\..+)$")
# Linear layers whose output the embedding never reads: the embedder pools ``last_hidden_state``
# itself, so Hugging Face's pooler (``pooler.dense``, tanh over the first token) is dead weight.
# They get no injection point (a delta there would be wasted work, and the pooler's input is
# [batch, hidden], not token rows), and an adapter's deltas on them change nothing we serve.
_UNREAD_RE = re.compile(r"(?:^|\.)pooler\.")


def canonical_module_name(name: str) -> str:
    """The part of a module path from ``encoder.layer.N`` on, so names from PEFT (which prefix
    ``base_model.model.`` and maybe ``bert.`` or ``0.auto_model.``) and ours compare equal; a
    module outside the layer stack (``pooler.dense``) loses PEFT's prefix only."""
    m = _LAYER_RE.search(name)
    if m:
        return m.group(1)
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def read_by_embedding(name: str) -> bool:
    """Whether the output of the linear layer ``name`` (canonical) reaches the pooled embedding."""
    return _UNREAD_RE.search(name) is None


def target_name(name: str) -> str:
    """``encoder.layer.0.attention.self.key`` -> ``key``: the short name PEFT's target_modules and
    HEADFLEET_LORA_TARGETS use."""
    return name.rsplit(".", 1)[-1]


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """What the low-rank product ``x @ A @ B`` is multiplied by: ``alpha / rank``, or
    ``alpha / sqrt(rank)`` with rsLoRA (PEFT's rule). ``rank`` >= 1; raises ``ZeroDivisionError`` at 0."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)
