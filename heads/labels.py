"""What a label is: one string, spelled one way — the rule every reader of labels applies.

JSON, CSV and JSONL hand us the same label in different clothes (``true``, ``"True"``, ``1``,
``1.0``, ``" 1 "``, ``"['billing', 'urgent']"``). Left alone, each spelling trains its own class.
:func:`canonical_label` maps every spelling to one string, and every place a label enters
headfleet (training data records and files, later feedback and canary sets) calls it.

The rule, ``canonical_label(value) -> str``:

    string     surrounding whitespace trimmed; then
                 "true" / "false" in any case             -> "true" / "false"
                 written as a JSON number ("1", "1.0", "-2.50", "1e3")  -> read as that number
                 anything else                            -> itself (case kept: "Spam" != "spam";
                                                             "01", "+1" and "1." are not JSON
                                                             numbers, so they stay as written)
    boolean    true / false                               -> "true" / "false"
    integer    its decimal                                -> 1 -> "1"
    float      integral: the integer's decimal            -> 1.0, "1.0", "1e0" -> "1"
               otherwise the shortest round-trip decimal, positional
                                                          -> 0.5 -> "0.5", 1e-05 -> "0.00001"
               NaN and infinity are refused
    missing    None, "" or no visible content (:func:`headfleet.text.is_blank`) is refused as a
               missing label (single-label readers keep "" so ``validate`` names every such row)
    list       a list — or a string that reads as one: a JSON array '["a", "b"]' or a Python list
               literal "['a', 'b']" — is a label *set*: multi-label data only; single-label data
               refuses it ("set multi_label"), never inventing a class named "['a', 'b']"; a
               string in brackets that is no valid list ("[draft]") is refused, not guessed at
    other      objects, lists inside lists, and anything else are refused
    any string holding a lone surrogate (a "\\ud83d" escape without its partner) is refused.

Multi-label cells (:meth:`LabelReader.read` with ``multi_label``): a list (JSON array), a
string that reads as a list (above), or "a|b" (:data:`LABEL_SEPARATOR`); a null or empty cell is
the empty set. Every element goes through the rule; empty elements are dropped; the set is
stored sorted and de-duplicated.

When two spellings in one data set become one label ("1" and "1.0"), :class:`LabelReader`
records them and ``validate`` says so in its warnings: the merge is deliberate, not silent.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import defaultdict
from decimal import Decimal
from numbers import Integral, Real
from typing import Any

from headfleet.errors import TrainingDataError
from headfleet.text import is_blank

LABEL_SEPARATOR = "|"

#: the JSON number grammar (RFC 8259 section 6), whole string
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: a list literal longer than this is refused rather than parsed (ast.literal_eval is safe from
#: code execution, not from pathological input)
_MAX_LIST_LITERAL = 10_000


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (a str Python holds but UTF-8 cannot), or None."""
    m = _SURROGATE.search(text)
    return m.group() if m else None


def refuse_lone_surrogate(text: str, where: str, what: str) -> None:
    """TrainingDataError naming ``where`` when ``text`` holds a lone surrogate."""
    ch = lone_surrogate(text)
    if ch is not None:
        raise TrainingDataError(
            f"{where}: {what} holds a lone surrogate U+{ord(ch):04X} (half of a UTF-16 pair, e.g. a "
            f"\\u{ord(ch):04x} escape without its partner), which is not valid Unicode text; fix or remove it"
        )


def canonical_label(value: Any, where: str = "label") -> str:
    """One label value -> its canonical string (the module's rule); TrainingDataError otherwise."""
    if isinstance(value, str):
        refuse_lone_surrogate(value, where, "the label")
        text = value.strip()
        if is_blank(text):
            raise TrainingDataError(f"{where}: missing label (empty, null or no visible content)")
        if _looks_like_list(text):
            items = _list_literal(text, where)
            raise TrainingDataError(
                f"{where}: the label {text!r} is a list of {len(items)} label(s) where one label is expected; "
                "for multi-label data set multi_label=true, otherwise give one label per row"
            )
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered
        m = _JSON_NUMBER.match(text)
        if m:
            if not (m.group(1) or m.group(2)):
                return "0" if text == "-0" else text  # the JSON integer grammar has one spelling per value
            number = float(text)
            if math.isfinite(number):
                return _float_label(number)
        return text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Integral):
        try:
            return str(int(value))
        except ValueError:  # more digits than Python will print (sys.get_int_max_str_digits)
            raise TrainingDataError(f"{where}: the integer label is too long to be a label") from None
    if isinstance(value, Real):
        number = float(value)
        if not math.isfinite(number):
            raise TrainingDataError(f"{where}: the label {value!r} is not a finite number")
        return _float_label(number)
    if value is None:
        raise TrainingDataError(f"{where}: missing label (empty, null or no visible content)")
    if isinstance(value, (list, tuple)):
        raise TrainingDataError(
            f"{where}: got a list label {list(value)!r} where one label is expected; "
            "for multi-label data set multi_label=true, otherwise give one label per row"
        )
    kind = "an object" if isinstance(value, dict) else f"a {type(value).__name__}"
    raise TrainingDataError(f"{where}: a label must be a string, number or boolean, got {kind} {value!r}")


def label_set(value: Any, where: str = "labels") -> list[str]:
    """One multi-label cell -> its sorted, de-duplicated label set (the module's rule)."""
    return sorted({label for label, _ in _label_set_spelled(value, where)})


class LabelReader:
    """Reads one data set's label cells by the rule and remembers which spellings it merged.

    ``read(value, where)`` gives a str (single-label; "" for a missing label, so ``validate``
    can name every unlabelled row at once) or a sorted list[str] (multi-label).
    ``merged()`` is {label: [spellings]} for every label that was written two or more ways.
    """

    def __init__(self, multi_label: bool):
        self.multi_label = bool(multi_label)
        self._spellings: dict[str, set[str]] = defaultdict(set)

    def read(self, value: Any, where: str) -> str | list[str]:
        if self.multi_label:
            pairs = _label_set_spelled(value, where)
            for label, spelling in pairs:
                self._spellings[label].add(spelling)
            return sorted({label for label, _ in pairs})
        if value is None or (isinstance(value, str) and not _SURROGATE.search(value) and is_blank(value)):
            return ""
        label = canonical_label(value, where)
        self._spellings[label].add(_spelling(value))
        return label

    def merged(self) -> dict[str, list[str]]:
        return {label: sorted(s) for label, s in sorted(self._spellings.items()) if len(s) > 1}


def merged_labels_message(label: str, spellings: list[str]) -> str:
    """``labels "1" and "1.0" were read as one label "1"``, for the validation report."""
    quoted = [json.dumps(s, ensure_ascii=False) for s in spellings]
    listed = ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return (f"labels {listed} were read as one label {json.dumps(label, ensure_ascii=False)} "
            "(numbers are read by value, true/false in any case as lower case); "
            "if they are different classes, rename one")


# -- helpers -------------------------------------------------------------------------------------
def _float_label(number: float) -> str:
    if number.is_integer():
        return str(int(number))
    text = repr(number)
    return format(Decimal(text), "f") if "e" in text else text


def _spelling(value: Any) -> str:
    """How a value was written, for the merge warning: strings trimmed, the rest as JSON writes it."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return repr(float(value))
    return repr(value)


def _looks_like_list(text: str) -> bool:
    return text.startswith("[") and text.endswith("]")


def _list_literal(text: str, where: str) -> list[Any]:
    """A JSON array or a Python list literal of scalars, else TrainingDataError."""
    items: Any = None
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):
        if len(text) <= _MAX_LIST_LITERAL:
            try:
                items = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                items = None
    if not isinstance(items, list):
        raise TrainingDataError(
            f"{where}: the label {text[:80]!r} looks like a list but is not a valid one; write a label list "
            'as a JSON array ["a", "b"] or as a|b, or remove the brackets'
        )
    for item in items:
        _refuse_non_scalar(item, text, where)
    return items


def _refuse_non_scalar(item: Any, cell: Any, where: str) -> None:
    if not isinstance(item, (str, bool, Integral, Real)):
        raise TrainingDataError(f"{where}: a label list holds strings and numbers only, got {item!r} in {cell!r}")


def _label_set_spelled(value: Any, where: str) -> list[tuple[str, str]]:
    """(label, spelling) for each element of one multi-label cell; blank elements dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        refuse_lone_surrogate(value, where, "the label")
        text = value.strip()
        if is_blank(text):
            return []
        parts: list[Any] = _list_literal(text, where) if _looks_like_list(text) else text.split(LABEL_SEPARATOR)
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, (bool, Integral, Real)):
        parts = [value]
    else:
        raise TrainingDataError(
            f"{where}: a multi-label cell must be a list, a list literal or 'a|b', "
            f"got {type(value).__name__} {value!r}"
        )
    out: list[tuple[str, str]] = []
    for part in parts:
        _refuse_non_scalar(part, value, where)
        if isinstance(part, str):
            refuse_lone_surrogate(part, where, "the label")
            if is_blank(part):
                continue
        out.append((canonical_label(part, where), _spelling(part)))
    return out
