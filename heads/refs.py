"""References to classifier versions: "name" (alias "latest"), "name@3" (version 3) or
"name@prod" (alias). The name rules themselves are ``headfleet.names``'.
"""

from __future__ import annotations

from dataclasses import dataclass

from headfleet.errors import ValidationError
from headfleet.names import check_alias, check_name

LATEST = "latest"
CANDIDATE = "candidate"  # the alias a monitor's retrain moves to its candidate (latest stays)


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None  # exactly one of version / alias is set
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else self.alias}"


def parse_ref(ref: str) -> Ref:
    """'name' -> alias latest; 'name@3' -> version 3; 'name@prod' -> alias prod."""
    if not isinstance(ref, str):
        raise ValidationError(f"a classifier reference must be a string, got {type(ref).__name__}")
    name, sep, tail = ref.partition("@")
    check_name(name, "classifier name")
    if not sep:
        return Ref(name, alias=LATEST)
    if tail.isdigit() and tail.isascii():
        version = int(tail)
        if version < 1:
            raise ValidationError(f"invalid version in {ref!r}: versions start at 1")
        return Ref(name, version=version)
    return Ref(name, alias=check_alias(tail))
