"""Per-classifier monitor settings: window size, the thresholds that decide, the trigger.

Every field has a documented default; ``PUT /classifiers/{name}/monitor`` sends any subset and
gets the full settings back. The defaults keep the names and thresholds of the tools users know:
PSI bands 0.1 / 0.25 (Siddiqi, *Credit Risk Scorecards*, 2006), a domain classifier's ROC AUC
0.55 (Evidently's embedding-drift default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from urllib.parse import urlsplit

from headfleet.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class MonitorSettings:
    """One classifier's monitoring configuration (all versions share it)."""

    window_texts: int | None = None  # close a window after this many /classify texts (wins over seconds)
    window_seconds: float = 3600.0  # otherwise close it after this long (wall clock)
    psi: float = 0.1  # drift when the predicted-label PSI exceeds this (0.1 moderate, 0.25 major shift)
    domain_auc: float = 0.55  # drift when the domain classifier's ROC AUC exceeds this
    accuracy_slo: float | None = None  # accuracy_drop when the canary accuracy is below this (None: off)
    accuracy_drop: float = 0.05  # ...or more than this under the version's own holdout accuracy
    consecutive: int = 2  # windows in a row with drift AND accuracy_drop before a retrain starts
    auto_retrain: bool = True  # start a retraining job on the trigger (the candidate is never promoted)
    webhook: str | None = None  # http(s) URL that receives every alert as JSON
    cooldown_seconds: float = 3600.0  # no second trigger this soon after one (nor while a retrain runs)
    retention_windows: int = 168  # closed windows kept per version (a week of hourly windows)
    feedback_max: int = 10_000  # feedback items kept per classifier (the oldest go first)
    rolling_canary: int = 500  # newest feedback items that form the canary's rolling part
    reservoir: int = 256  # embeddings and confidences sampled per window (Vitter's algorithm R)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


INT_FIELDS = {"window_texts", "consecutive", "retention_windows", "feedback_max", "rolling_canary", "reservoir"}
_FLOAT_FIELDS = {"window_seconds", "psi", "domain_auc", "accuracy_slo", "accuracy_drop", "cooldown_seconds"}
NULLABLE = {"window_texts", "accuracy_slo", "webhook"}
# field -> (lowest, highest) allowed, both inclusive
RANGES: dict[str, tuple[float, float]] = {
    "window_texts": (10, 10_000_000), "window_seconds": (1, 30 * 86400), "psi": (0.0, 100.0),
    "domain_auc": (0.5, 1.0), "accuracy_slo": (0.0, 1.0), "accuracy_drop": (0.0, 1.0), "consecutive": (1, 1000),
    "cooldown_seconds": (0, 365 * 86400), "retention_windows": (1, 100_000), "feedback_max": (10, 10_000_000),
    "rolling_canary": (0, 100_000), "reservoir": (20, 5000),
}


def merge_settings(current: MonitorSettings, patch: dict[str, Any]) -> MonitorSettings:
    """``current`` with the fields of ``patch`` replaced, each checked.

    Raises ValidationError (422) naming the field for an unknown field, a wrong type (a bool is
    not a number), a value outside its range, or a webhook that is not an absolute http(s) URL.
    """
    fields = {f.name for f in dataclasses.fields(MonitorSettings)}
    changes: dict[str, Any] = {}
    for key, value in patch.items():
        if key not in fields:
            raise ValidationError(f"unknown monitor setting {key!r}; expected some of {sorted(fields)}", param=key)
        if value is None:
            if key not in NULLABLE:
                raise ValidationError(f"{key} cannot be null", param=key)
            changes[key] = None
            continue
        if key in INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(f"{key} must be an integer, got {value!r}", param=key)
        elif key in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValidationError(f"{key} must be a finite number, got {value!r}", param=key)
            value = float(value)
        elif key == "auto_retrain":
            if not isinstance(value, bool):
                raise ValidationError(f"auto_retrain must be true or false, got {value!r}", param=key)
        elif key == "webhook":
            value = _check_webhook(value)
        if key in RANGES:
            lo, hi = RANGES[key]
            if not lo <= value <= hi:
                raise ValidationError(f"{key} must be between {lo:g} and {hi:g}, got {value!r}", param=key)
        changes[key] = value
    return dataclasses.replace(current, **changes)


def settings_from_dict(data: dict[str, Any]) -> MonitorSettings:
    """Settings as stored; fields a newer version added take their defaults, unknown ones are dropped."""
    fields = {f.name for f in dataclasses.fields(MonitorSettings)}
    return MonitorSettings(**{k: v for k, v in data.items() if k in fields})


def _check_webhook(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"webhook must be a URL string, got {value!r}", param="webhook")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c in value for c in " \r\n\t"):
        raise ValidationError(f"webhook must be an absolute http(s) URL, got {value!r}", param="webhook")
    return value
