"""HeadArrays: conversion from each supported sklearn estimator, persistence, size."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import MultiLabelBinarizer

from headfleet.errors import ValidationError
from headfleet.heads import HeadArrays


def _fit(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP convergence on tiny data is irrelevant here
        return model.fit(X, y)


@pytest.mark.parametrize(
    "make_model, classes",
    [
        (lambda s: LogisticRegression(max_iter=2000), ["neg", "pos"]),
        (lambda s: LogisticRegression(max_iter=2000), ["a", "b", "c"]),
        (lambda s: MLPClassifier((16,), max_iter=200, random_state=s), ["neg", "pos"]),
        (lambda s: MLPClassifier((16,), max_iter=200, random_state=s), ["a", "b", "c"]),
    ],
    ids=["logreg-binary", "logreg-3", "mlp-binary", "mlp-3"],
)
def test_single_label_conversion_matches_sklearn(make_model, classes, make_clusters, seed):
    X, y = make_clusters({c: 20 for c in classes}, noise=0.08)
    model = _fit(make_model(seed), X, y)
    head = HeadArrays.from_sklearn(model, labels=list(model.classes_), multi_label=False)
    assert head.labels == classes and not head.multi_label
    np.testing.assert_allclose(head.predict_proba(X), model.predict_proba(X), atol=1e-5)
    assert head.predict_proba(X).dtype == np.float32


@pytest.mark.parametrize("kind", ["ovr-logreg", "mlp"])
def test_multi_label_conversion_matches_sklearn(kind, make_multilabel, seed):
    X, sets = make_multilabel(["x", "y", "z"], 60)
    Y = MultiLabelBinarizer(classes=["x", "y", "z"]).fit_transform(sets)
    model = OneVsRestClassifier(LogisticRegression()) if kind == "ovr-logreg" else MLPClassifier((16,), max_iter=200, random_state=seed)
    _fit(model, X, Y)
    head = HeadArrays.from_sklearn(model, labels=["x", "y", "z"], multi_label=True)
    assert head.multi_label
    np.testing.assert_allclose(head.predict_proba(X), model.predict_proba(X), atol=1e-5)


def test_ovr_label_constant_in_training_is_kept_exactly(make_multilabel):
    X, sets = make_multilabel(["x", "y"], 40)
    Y = MultiLabelBinarizer(classes=["x", "y"]).fit_transform(sets)
    Y = np.column_stack([Y, np.ones(len(Y), dtype=int), np.zeros(len(Y), dtype=int)])  # always / never
    model = _fit(OneVsRestClassifier(LogisticRegression()), X, Y)
    head = HeadArrays.from_sklearn(model, labels=["x", "y", "always", "never"])
    np.testing.assert_allclose(head.predict_proba(X), model.predict_proba(X), atol=1e-5)


def test_save_load_round_trip_is_identical(tmp_path, make_clusters, seed):
    X, y = make_clusters({"a": 15, "b": 15, "c": 15})
    for i, model in enumerate([LogisticRegression(max_iter=2000), MLPClassifier((8,), max_iter=100, random_state=seed)]):
        head = HeadArrays.from_sklearn(_fit(model, X, y))
        head.save(tmp_path / str(i))
        back = HeadArrays.load(tmp_path / str(i))
        assert back == head
        assert np.array_equal(back.predict_proba(X), head.predict_proba(X))


def test_binary_logreg_is_a_few_kilobytes(make_clusters):
    X, y = make_clusters({"neg": 10, "pos": 10})
    head = HeadArrays.from_sklearn(LogisticRegression().fit(X, y))
    assert head.W1.shape == (2, 384)
    assert 1_000 < head.nbytes < 8_000


def test_unsupported_estimators_are_refused(make_clusters, make_multilabel):
    X, y = make_clusters({"a": 10, "b": 10, "c": 10})
    with pytest.raises(ValidationError, match="relu"):
        HeadArrays.from_sklearn(_fit(MLPClassifier((4,), activation="tanh", max_iter=5), X, y))
    with pytest.raises(ValidationError, match="hidden layer"):
        HeadArrays.from_sklearn(_fit(MLPClassifier((4, 4), max_iter=5), X, y))
    with pytest.raises(ValidationError, match="multi-label"):
        HeadArrays.from_sklearn(_fit(OneVsRestClassifier(LogisticRegression()), X, y))
    with pytest.raises(ValidationError, match="single-label"):
        HeadArrays.from_sklearn(LogisticRegression().fit(X, y), multi_label=True)
    with pytest.raises(ValidationError, match="not fitted"):
        HeadArrays.from_sklearn(LogisticRegression())


def test_inconsistent_arrays_are_refused():
    with pytest.raises(ValidationError):
        HeadArrays("logreg", ["a", "b"], False, np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValidationError):
        HeadArrays("mlp", ["a", "b"], False, np.zeros((5, 4)), np.zeros(5))
    with pytest.raises(ValidationError):
        HeadArrays("tree", ["a", "b"], False, np.zeros((2, 4)), np.zeros(2))
