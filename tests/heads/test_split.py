"""heads.split: both holdout rules are pure functions of (y, multi_label, holdout, seed)."""

from __future__ import annotations

import numpy as np
import pytest

from headfleet.errors import TrainingDataError
from headfleet.heads.split import holdout_split, per_class_holdout


@pytest.mark.parametrize("rule", [holdout_split, per_class_holdout])
@pytest.mark.parametrize("multi_label", [False, True])
def test_a_split_covers_every_row_once_and_repeats_for_a_seed(rule, multi_label):
    rng = np.random.default_rng(0)
    y = (rng.random((97, 3)) < 0.5).astype(np.int64) if multi_label else rng.integers(0, 3, 97)
    if multi_label:
        y[np.arange(3), np.arange(3)] = 1  # every label occurs
    split = rule(y, multi_label, 0.2, seed=7)
    assert np.array_equal(np.sort(np.concatenate(split)), np.arange(97))
    assert all(np.array_equal(np.sort(part), part) and part.dtype == np.int64 for part in split)
    again = rule(y, multi_label, 0.2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(split, again))


def test_holdout_split_is_stratified_with_one_row_per_class_at_least():
    y = np.repeat(np.arange(5), 2)
    split = holdout_split(y, False, 0.2, seed=0)
    assert sorted(y[split.holdout].tolist()) == [0, 1, 2, 3, 4]
    assert len(holdout_split(y, False, 0.0, seed=0).holdout) == 0
    with pytest.raises(TrainingDataError, match="cannot hold out"):
        holdout_split(np.array([0, 0, 0, 1]), False, 0.2, seed=0)  # a class with one example


def test_per_class_holdout_keeps_small_classes_whole_in_training():
    y = np.array([0] * 20 + [1] * 2)
    split = per_class_holdout(y, False, 0.15, seed=0)
    assert len(split.holdout) == 3 and set(y[split.holdout].tolist()) == {0}
    assert len(per_class_holdout(y[:2], False, 0.15, seed=0).holdout) == 0
