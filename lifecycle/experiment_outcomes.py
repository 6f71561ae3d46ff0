"""An experiment's outcomes: each posted item checked on its own, per-unit values, slices by segment."""

from __future__ import annotations

from typing import Any

import numpy as np

from headfleet.errors import ValidationError
from headfleet.lifecycle import experiment_stats
from headfleet.lifecycle.experiment_config import check_text, check_unit

MAX_SEGMENTS = 100  # distinct segments reported as slices


def check_item(item: Any, units: dict[str, str]) -> str | None:
    """Why an outcome item is refused, or None when it is good (its unit was exposed, its value finite)."""
    if not isinstance(item, dict):
        return "an item is an object {\"unit\", \"value\", \"id\"?, \"segment\"?}"
    extra = sorted(set(item) - {"unit", "value", "id", "segment"})
    if extra:
        return f"unknown field(s) {extra}"
    try:
        unit = check_unit(item.get("unit"))
    except ValidationError as exc:
        return exc.message
    if unit is None:
        return "unit is required"
    if unit not in units:
        return "unit was never assigned to this experiment (no classify request carried it)"
    value = item.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return "value must be a finite number"
    for field in ("id", "segment"):
        if item.get(field) is not None:
            try:
                check_text(item[field], field)
            except ValidationError as exc:
                return exc.message
    return None


def unit_values(units: dict[str, str], values: dict[str, float], arm: str, missing: str,
            only: set[str] | None = None) -> np.ndarray:
    """One value per exposed unit of ``arm``: the sum of its outcomes; 0 or left out without one."""
    out = []
    for unit, a in units.items():
        if a != arm or (only is not None and unit not in only):
            continue
        if unit in values:
            out.append(values[unit])
        elif missing == "zero":
            out.append(0.0)
    return np.asarray(out, dtype=np.float64)


def slices(units: dict, values: dict, segments: dict, cfg: dict) -> dict:
    """The comparison within each segment the outcomes named (units without a segment are in none)."""
    by: dict[str, set[str]] = {}
    for unit, seg in segments.items():
        by.setdefault(seg, set()).add(unit)
    out = {}
    for seg in sorted(by)[:MAX_SEGMENTS]:
        c = unit_values(units, values, "control", cfg["missing"], by[seg])
        t = unit_values(units, values, "treatment", cfg["missing"], by[seg])
        s = experiment_stats.compare(c, t, split=cfg["split"], min_samples=cfg["min_samples"],
                                     sequential=cfg["sequential"])
        out[seg] = {"arms": s["arms"], "lift": s["lift"], "relative_lift": s["relative_lift"], "ci95": s["ci95"],
                    "welch": s["welch"], "p": s["p"]}
    return out
