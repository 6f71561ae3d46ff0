"""Names: what a tenant, a classifier, a namespace and an alias may look like — one rule, owned here.

Names become directory names and cache-key parts, so the patterns are strict (lower-case, no path
separators, no leading dot — hidden names are the registry's own temp and trash entries).
"""

from __future__ import annotations

import re

from headfleet.errors import ValidationError

#: The cache tiers in lookup order (fastest first), as answers and reports name them; a text no
#: tier held is a ``MISS``, and a text that needed several embeddings (a LoRA classifier's beside
#: the shared one) of which some were held and some computed is ``PARTIAL``. Here, not in
#: ``headfleet.cache``, so that a report (``scoring``) can name them without importing FAISS and Redis.
TIER_NAMES = ("memory", "local", "redis")
MISS = "miss"
PARTIAL = "partial"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")  # \Z, not $ (which also matches before a final "\n")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")


SHOWN_CHARS = 80  # of a refused value, quoted in its error message


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, clipped: a 100 KB name comes back as its first
    ``limit`` characters and its length, not as a 100 KB answer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def check_name(value: str, what: str) -> str:
    """A tenant or classifier name; ValidationError otherwise."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValidationError(
            f"invalid {what} {shown(value)}: use 1-64 of a-z 0-9 _ . - starting with a letter or digit"
        )
    return value


def check_alias(value: str) -> str:
    if not isinstance(value, str) or not ALIAS_RE.fullmatch(value) or value.isdigit():
        raise ValidationError(
            f"invalid alias {shown(value)}: use 1-32 of a-z 0-9 _ - starting with a letter"
        )
    return value
