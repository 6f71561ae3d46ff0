"""Check training data before any fitting: refuse what cannot give a usable head, warn on risk.

Refused (TrainingDataError, with what is wrong, where, and how to fix it):
    no examples; texts with no visible content (empty, whitespace, or only zero-width and
    formatting characters: ``headfleet.text.is_blank``, the rule every entry point shares);
    an empty label (single-label data);
    fewer than two classes; any class with fewer than 2 examples (one must train, one must be
    held out for the metrics to mean anything).
Warned (``ValidationReport.warnings``, training goes on):
    labels written two or more ways that the label rule read as one ("1" and "1.0": see
    ``headfleet.heads.labels``); a class with fewer than 8 examples; imbalance over 10:1;
    duplicate rows; texts that appear with different labels; a label on every example
    (multi-label: nothing to learn); unknown-token share over 5%; truncated share over 10%
    (both measured by the caller's tokenizer, since heads/ knows nothing about tokenisation).
Row numbers are 1-based positions in the data (for a CSV, the header is not counted).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from headfleet.errors import TrainingDataError
from headfleet.heads.examples import Examples
from headfleet.heads.labels import merged_labels_message
from headfleet.text import blank_message, is_blank

MIN_PER_CLASS = 2
FEW_PER_CLASS = 8
MAX_IMBALANCE = 10.0
MAX_UNK_SHARE = 0.05
MAX_TRUNCATED_SHARE = 0.1
_MAX_ROWS_NAMED = 10


@dataclass
class TokenStats:
    """Tokenizer-side facts about the texts, computed by the caller's tokenizer."""

    unk_share: float  # unknown tokens / all tokens
    truncated_share: float  # texts longer than max_length / all texts


@dataclass
class ValidationReport:
    n_examples: int
    per_class: dict[str, int]
    duplicates: int  # rows whose (text, label) repeats an earlier row
    conflicting: int  # distinct texts that appear with more than one label
    unk_share: float | None = None
    truncated_share: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate(examples: Examples, token_stats: TokenStats | None = None) -> ValidationReport:
    """Refuse unusable data (TrainingDataError) or return the report with its warnings."""
    n = len(examples)
    if n == 0:
        raise TrainingDataError("no examples: the training data holds no rows; add at least 2 examples per class")
    _refuse_empty_texts(examples)
    per_class = _count_classes(examples)
    _refuse_few_classes(examples, per_class)

    warnings: list[str] = _merged_label_warnings(examples)
    few = {c: k for c, k in per_class.items() if k < FEW_PER_CLASS}
    if few:
        warnings.append(
            f"few examples in {len(few)} class(es) ({_fmt_counts(few)}); under {FEW_PER_CLASS} per class "
            "the head and its holdout metrics are unreliable — add examples"
        )
    most, least = max(per_class.values()), min(per_class.values())
    if least and most / least > MAX_IMBALANCE:
        big = max(per_class, key=per_class.get)
        small = min(per_class, key=per_class.get)
        warnings.append(
            f"class imbalance {most / least:.1f}:1 ({big!r} {most} vs {small!r} {least}); the head will "
            "favour the large class — add examples of the small one"
        )
    if examples.multi_label:
        everywhere = sorted(c for c, k in per_class.items() if k == n)
        if everywhere:
            warnings.append(
                f"label(s) {everywhere} are on every example; the head will always predict them — "
                "add examples without them"
            )

    duplicates, conflicting, conflict_rows = _duplicates_and_conflicts(examples)
    if duplicates:
        warnings.append(f"{duplicates} duplicate row(s) (same text and label as an earlier row); they add weight, not information")
    if conflicting:
        warnings.append(
            f"{conflicting} text(s) appear with different labels (e.g. rows {conflict_rows}); "
            "the head cannot satisfy both — fix the labels"
        )
    unk = trunc = None
    if token_stats is not None:
        unk, trunc = float(token_stats.unk_share), float(token_stats.truncated_share)
        if unk > MAX_UNK_SHARE:
            warnings.append(f"{unk:.1%} of tokens are unknown to the tokenizer (over {MAX_UNK_SHARE:.0%}); the backbone may not suit this language or domain")
        if trunc > MAX_TRUNCATED_SHARE:
            warnings.append(f"{trunc:.1%} of texts are longer than the max length and were truncated (over {MAX_TRUNCATED_SHARE:.0%}); their endings are ignored")
    return ValidationReport(
        n_examples=n,
        per_class=dict(sorted(per_class.items())),
        duplicates=duplicates,
        conflicting=conflicting,
        unk_share=unk,
        truncated_share=trunc,
        warnings=warnings,
    )


def _rows(indices: list[int]) -> str:
    shown = ", ".join(str(i + 1) for i in indices[:_MAX_ROWS_NAMED])
    more = f" and {len(indices) - _MAX_ROWS_NAMED} more" if len(indices) > _MAX_ROWS_NAMED else ""
    return shown + more


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{c!r}: {k}" for c, k in sorted(counts.items()))


def _refuse_empty_texts(examples: Examples) -> None:
    empty = [i for i, t in enumerate(examples.texts) if is_blank(t)]
    if empty:
        raise TrainingDataError(
            blank_message(f"the text in row(s) {_rows(empty)}") + "; remove those rows or fill in the text"
        )
    if not examples.multi_label:
        unlabelled = [i for i, label in enumerate(examples.labels) if not label or is_blank(label)]
        if unlabelled:
            raise TrainingDataError(
                f"empty label in row(s) {_rows(unlabelled)} (missing, null or no visible content); "
                "label those rows or remove them"
            )


def _merged_label_warnings(examples: Examples) -> list[str]:
    merged = sorted(examples.label_spellings.items())
    out = [merged_labels_message(label, spellings) for label, spellings in merged[:_MAX_ROWS_NAMED]]
    if len(merged) > _MAX_ROWS_NAMED:
        out.append(f"... and {len(merged) - _MAX_ROWS_NAMED} more label(s) written two or more ways")
    return out


def _count_classes(examples: Examples) -> dict[str, int]:
    if examples.multi_label:
        return dict(Counter(label for row in examples.labels for label in row))
    return dict(Counter(examples.labels))


def _refuse_few_classes(examples: Examples, per_class: dict[str, int]) -> None:
    if len(per_class) < 2:
        only = f"only one class ({next(iter(per_class))!r})" if per_class else "no labels at all"
        raise TrainingDataError(
            f"{only} in {len(examples)} examples; a classifier needs at least 2 classes — "
            "add examples of the other class(es)"
        )
    scarce = {c: k for c, k in per_class.items() if k < MIN_PER_CLASS}
    if scarce:
        where = []
        for c in sorted(scarce):
            rows = [
                i for i, label in enumerate(examples.labels)
                if (c in label if examples.multi_label else label == c)
            ]
            where.append(f"{c!r} (row {_rows(rows)})")
        raise TrainingDataError(
            f"class(es) with fewer than {MIN_PER_CLASS} examples: {', '.join(where)}; every class needs at "
            f"least {MIN_PER_CLASS} (one to train on, one to hold out) — add examples or remove the class"
        )


def _duplicates_and_conflicts(examples: Examples) -> tuple[int, int, str]:
    seen: set[tuple[str, Any]] = set()
    by_text: dict[str, dict[Any, int]] = defaultdict(dict)
    duplicates = 0
    for i, (text, label) in enumerate(zip(examples.texts, examples.labels)):
        key = (text.strip(), tuple(label) if examples.multi_label else label)
        if key in seen:
            duplicates += 1
        seen.add(key)
        by_text[key[0]].setdefault(key[1], i)
    conflicts = [sorted(labels.values()) for labels in by_text.values() if len(labels) > 1]
    example_rows = _rows(conflicts[0]) if conflicts else ""
    return duplicates, len(conflicts), example_rows
