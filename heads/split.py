"""Holdout splits: which training rows are kept out to measure what was trained.

Every split in headfleet lives here, so heads (``heads.train.train_head``) and LoRA adapters
(``engine.training`` splits and hands the indices to ``embedder.lora_train.train_lora``, which
cannot import heads) are measured on holdouts drawn by documented rules. Two rules exist:

    holdout_split       heads. Single-label: stratified by class (sklearn ``train_test_split``,
                        ``stratify=y``), max(n_classes, round(holdout * n)) rows, so every class
                        can appear in the holdout. Multi-label: plain random (stratifying on label
                        sets is undefined), the same size capped at half the data.
    per_class_holdout   LoRA adapters. Per class in sorted order (multi-label: by first label),
                        max(1, round(holdout * rows)) rows drawn with numpy's ``default_rng(seed)``;
                        a class with fewer than three rows stays whole in the train split.

Both give the same sizes and class counts on ordinary data (sms_spam: 36 of 240, 30 ham and 6
spam) but not the same rows. They are not merged because tests pin each caller's figures: the
heads tests count holdout rows per class on tiny classes, and the LoRA engine test checks the
labels of a trained adapter, which move with its training rows. Moving LoRA onto
``holdout_split`` is a behaviour change to make on purpose, with its figures re-measured.

Each is a pure function of ``(y, multi_label, holdout, seed)``: the same data and seed give the
same rows on every run and every machine. ``holdout = 0`` keeps nothing out in both.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from headfleet.errors import TrainingDataError

#: per_class_holdout leaves a class with fewer rows than this wholly in the train split
PER_CLASS_MIN_ROWS = 3


class Split(NamedTuple):
    """Row indices into the examples, each sorted ascending; together they cover every row once."""

    train: np.ndarray  # [n_train] int64
    holdout: np.ndarray  # [n_holdout] int64


def holdout_split(y: np.ndarray, multi_label: bool, holdout: float, seed: int) -> Split:
    """The heads' split (see the module docstring): stratified for single-label, random for multi-label.

    ``y``: [n] class indices (single-label) or [n, L] 0/1 indicators (multi-label; any numeric
    dtype). ``holdout``: the share held out, in [0, 1). ``seed``: sklearn's ``random_state``.
    Raises ``TrainingDataError`` when the rule cannot be met (a class with a single example, or
    more classes than rows to hold out); ``validate`` refuses such data before training.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    n = len(y)
    idx = np.arange(n)
    if holdout == 0.0:
        return Split(idx, idx[:0])
    n_classes = y.shape[1] if multi_label else len(np.unique(y))
    size = max(n_classes, round(holdout * n))
    try:
        if multi_label:
            size = max(1, min(size, n // 2))
            train, test = train_test_split(idx, test_size=size, random_state=seed, shuffle=True)
        else:
            train, test = train_test_split(idx, test_size=size, random_state=seed, stratify=y)
    except ValueError as e:  # only reachable with data that skipped validate()
        raise TrainingDataError(f"cannot hold out {size} of {n} examples over {n_classes} classes: {e}") from None
    return Split(np.sort(train), np.sort(test))


def per_class_holdout(y: np.ndarray, multi_label: bool, holdout: float, seed: int) -> Split:
    """The LoRA adapters' split (see the module docstring): a share of every class with at least
    ``PER_CLASS_MIN_ROWS`` rows, at least one row each; empty for tiny data sets.

    ``y``: [n] class indices (single-label) or [n, L] 0/1 indicators (multi-label: a row counts for
    its first label). ``holdout``: the share of each class held out (0 still holds out one row per
    class that is large enough). ``seed``: seeds ``numpy.random.default_rng``. Never raises on
    well-formed ``y``.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    keys = y.argmax(1) if multi_label and y.ndim == 2 else y
    out: list[int] = []
    for c in np.unique(keys):
        rows = np.flatnonzero(keys == c)
        if len(rows) < PER_CLASS_MIN_ROWS:
            continue
        k = max(1, int(round(len(rows) * holdout)))
        out.extend(rng.choice(rows, size=k, replace=False).tolist())
    test = np.array(sorted(out), dtype=np.int64)
    return Split(np.setdiff1d(np.arange(len(y)), test), test)
