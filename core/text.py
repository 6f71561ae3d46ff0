"""What counts as a text with content — one rule for every place a text enters headfleet.

``str.strip()`` keeps zero-width spaces, joiners, the BOM, soft hyphens, variation selectors,
Hangul fillers and the Braille blank; the backbone's tokenizer drops all of them, so a text made
only of such characters would be embedded as the empty string and classified with confident
scores. :func:`is_blank` is true for such a text, and every entry point (``/classify``,
``/embed``, ``/v1/embeddings``, training data, scoring rows) refuses it like an empty one.

The rule, per character: it carries no content when its Unicode general category is a separator
(``Zs``, ``Zl``, ``Zp``), a control or format character (``Cc``, ``Cf``), unassigned or a
surrogate (``Cn``, ``Cs``), private use (``Co``: no meaning the backbone knows, and its tokenizer
drops it), a combining mark (``Mn``, ``Me``: with no base character there is
nothing for it to mark, and an uncased tokenizer strips it), or one of the letters and symbols
that render as blank space (:data:`BLANK_LETTERS`). A text is blank when every character is.
The test suite checks the rule against the backbone's tokenizer over all of Unicode's planes
0-3 and 14: every character the tokenizer turns into no token is blank here.

Reference: The Unicode Standard, chapter 4.5 (General Category) and UAX #44; the invisible
letters are the ones Unicode lists with ``Default_Ignorable_Code_Point`` that are not ``Cf``.
"""

from __future__ import annotations

import functools
import unicodedata

#: General categories whose characters carry no visible content on their own.
BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cn", "Co", "Cs", "Mn", "Me"})

#: Letters and symbols that render as blank space (Default_Ignorable or blank by design).
BLANK_LETTERS = frozenset({
    "\u115f", "\u1160",  # Hangul choseong / jungseong fillers
    "\u3164",  # Hangul filler
    "\uffa0",  # halfwidth Hangul filler
    "\u2800",  # Braille pattern blank
    "\u180e",  # Mongolian vowel separator (Cf in current Unicode, Zs in older data)
    "\u17b4", "\u17b5",  # Khmer inherent vowels (Default_Ignorable)
    "\ufffd",  # the replacement character: what undecodable bytes became, no content of their own
    "\u1734",  # Hanunoo sign pamudpod: Mc since Unicode 14, a mark the tokenizer strips like Mn
})


def is_blank_char(ch: str) -> bool:
    """True when the one character ``ch`` carries no visible content (see the module's rule)."""
    return ch in BLANK_LETTERS or unicodedata.category(ch) in BLANK_CATEGORIES


def is_blank(text: str) -> bool:
    """True when ``text`` has no visible content: empty, or only characters :func:`is_blank_char`
    calls blank (whitespace, zero-width and format characters, lone combining marks, fillers).

    Cost: one pass over the text, stopping at the first visible character (usually the first).
    """
    for ch in text:
        if not is_blank_char(ch):
            return False
    return True


def blank_message(where: str) -> str:
    """The one wording of the refusal, e.g. ``texts[2] is empty or has no visible content ...``."""
    return (f"{where} is empty or has no visible content (only whitespace, zero-width or formatting "
            "characters); every text needs some content")


@functools.lru_cache(maxsize=1)
def visible_pattern() -> str:
    """A regular expression (Python ``re`` syntax, ``\\uXXXX``/``\\UXXXXXXXX`` escapes) that finds a
    character with content: a negated class of every blank character, surrogates aside (a JSON
    text cannot hold a lone one). It matches somewhere in a text exactly when :func:`is_blank` is
    false; the OpenAPI document uses it as a text's ``pattern``. Computed once (about a second)."""
    ranges: list[tuple[int, int]] = []
    start = None
    for cp in range(0x110000):
        blank = is_blank_char(chr(cp)) and not 0xD800 <= cp <= 0xDFFF
        if blank and start is None:
            start = cp
        elif not blank and start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))

    def esc(cp: int) -> str:
        return f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"

    return "[^" + "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges) + "]"
