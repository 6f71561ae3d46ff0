"""An experiment's pre-registered configuration: checked once at creation, frozen afterwards.

``check_config(body, resolve)`` turns a ``POST /experiments`` body into the stored configuration:
``control`` and ``treatment`` (a version number, digits, or an alias) are resolved and pinned to
version numbers then; later alias moves change nothing. Every refusal is a ValidationError (422)
naming the field; nothing is stored for a refused body. The units a request carries are checked by
``check_unit``.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, Callable

from headfleet.errors import ValidationError
from headfleet.lifecycle.windows import iso
from headfleet.names import check_name

FIELDS = {"name", "classifier", "control", "treatment", "split", "metric", "min_samples", "guardrails",
          "sequential", "missing"}
GUARDRAILS = {"p99_ms": (0.001, 3_600_000.0), "error_rate": (0.0, 1.0)}
MISSING = ("zero", "exclude")
MAX_UNIT_CHARS = 256
MAX_TEXT_CHARS = 200  # experiment name, metric, segment


def new_id() -> str:
    """``exp-`` and 12 random hex digits (48 bits): unguessable enough that ids never collide."""
    return "exp-" + secrets.token_hex(6)


def check_unit(unit: Any, field: str = "unit") -> str | None:
    """An experiment unit (a user, session or account id): 1-256 characters, no control characters.
    None passes (no unit: the request gets control and counts toward neither arm)."""
    if unit is None:
        return None
    if not isinstance(unit, str) or not unit or len(unit) > MAX_UNIT_CHARS:
        raise ValidationError(f"{field} must be a string of 1-{MAX_UNIT_CHARS} characters", param=field)
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in unit):
        raise ValidationError(f"{field} must not hold control characters or lone surrogates", param=field)
    return unit


def check_text(value: Any, field: str, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CHARS:
        raise ValidationError(f"{field} must be a string of 1-{MAX_TEXT_CHARS} characters", param=field)
    return value


def _number(body: dict, field: str, lo: float, hi: float, default: float, *, integer: bool = False,
            open_ends: bool = False) -> float:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ValidationError(f"{field} must be {'an integer' if integer else 'a number'}", param=field)
    value = float(value)
    bad = not (lo < value < hi) if open_ends else not (lo <= value <= hi)
    if not math.isfinite(value) or bad:
        ends = f"strictly between {lo:g} and {hi:g}" if open_ends else f"from {lo:g} to {hi:g}"
        raise ValidationError(f"{field} must be {ends}, got {value:g}", param=field)
    return int(value) if integer else value


def _arm_ref(value: Any, field: str) -> str:
    """A version (int or digits) or an alias, as a ref suffix."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValidationError(f"{field} must be a version number or an alias (\"prod\", \"candidate\")", param=field)
    return str(value)


def check_config(body: Any, resolve: Callable[[str], dict]) -> dict:
    """The stored configuration of a new experiment from its ``POST /experiments`` body.

    ``resolve(ref) -> manifest`` resolves ``"name@ref"`` in the tenant's registry (NotFoundError,
    404, for an unknown classifier, version or alias). Returns ``{"id", "name", "classifier",
    "control": {"ref", "version"}, "treatment": {...}, "split", "metric", "min_samples",
    "guardrails", "sequential", "missing", "created"}``."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ValidationError(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}", param=unknown[0])
    for field in ("classifier", "control", "treatment"):
        if field not in body:
            raise ValidationError(f"{field} is required", param=field)
    classifier = body["classifier"]
    if not isinstance(classifier, str) or "@" in classifier:
        raise ValidationError("classifier must be a classifier name (the experiment splits its bare name's "
                              "traffic; control and treatment say the versions)", param="classifier")
    check_name(classifier, "classifier name")
    arms = {}
    for field in ("control", "treatment"):
        ref = _arm_ref(body[field], field)
        manifest = resolve(f"{classifier}@{ref}")
        arms[field] = {"ref": ref, "version": int(manifest["version"])}
    guardrails = body.get("guardrails") or {}
    if not isinstance(guardrails, dict):
        raise ValidationError("guardrails must be an object like {\"p99_ms\": 50, \"error_rate\": 0.01}",
                              param="guardrails")
    bad = sorted(set(guardrails) - set(GUARDRAILS))
    if bad:
        raise ValidationError(f"unknown guardrail(s) {bad}; allowed: {sorted(GUARDRAILS)}", param="guardrails")
    limits = {k: _number(guardrails, k, *GUARDRAILS[k], default=0.0) for k in guardrails}
    sequential = body.get("sequential", True)
    if not isinstance(sequential, bool):
        raise ValidationError("sequential must be true or false", param="sequential")
    missing = body.get("missing", "zero")
    if missing not in MISSING:
        raise ValidationError(f"missing must be one of {list(MISSING)}", param="missing")
    now = time.time()
    return {
        "id": new_id(),
        "name": check_text(body.get("name"), "name", default=f"{classifier} {arms['control']['version']} vs "
                                                             f"{arms['treatment']['version']}"),
        "classifier": classifier,
        "control": arms["control"],
        "treatment": arms["treatment"],
        "split": _number(body, "split", 0.0, 1.0, 0.5, open_ends=True),
        "metric": check_text(body.get("metric"), "metric", default="outcome"),
        "min_samples": _number(body, "min_samples", 2, 10**9, 100, integer=True),
        "guardrails": limits,
        "sequential": sequential,
        "missing": missing,
        "created": iso(now),  # ISO 8601 UTC, like jobs and monitor windows
        "created_ts": now,  # for ordering within a second
    }
