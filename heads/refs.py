"""Names and references: what a tenant, a classifier, an alias and a ref may look like.

Names become directory names, so the patterns are strict (lower-case, no path separators, no
leading dot — hidden names are the registry's own temp and trash entries). A ref is
"name" (alias "latest"), "name@3" (version 3) or "name@prod" (alias).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from headfleet.errors import ValidationError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
LATEST = "latest"


def check_name(value: str, what: str) -> str:
    """A tenant or classifier name; ValidationError otherwise."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(
            f"invalid {what} {value!r}: use 1-64 of a-z 0-9 _ . - starting with a letter or digit"
        )
    return value


def check_alias(value: str) -> str:
    if not isinstance(value, str) or not ALIAS_RE.match(value) or value.isdigit():
        raise ValidationError(
            f"invalid alias {value!r}: use 1-32 of a-z 0-9 _ - starting with a letter"
        )
    return value


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
