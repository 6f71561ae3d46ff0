"""train_head: what ships is measured on a stratified holdout; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from headfleet.errors import TrainingDataError, ValidationError
from headfleet.heads import HeadFleet, examples_from_records, train_head, validate


def _examples(labels):
    return examples_from_records([(f"text {i}", y) for i, y in enumerate(labels)], multi_label=isinstance(labels[0], list))


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_separable_data_trains_well_with_stratified_holdout(kind, make_clusters, seed):
    X, y = make_clusters({"billing": 30, "bug": 30, "praise": 30}, noise=0.05)
    trained = train_head(X, _examples(y), kind=kind, seed=seed)
    m = trained.metrics
    assert trained.head.kind == kind and trained.head.labels == ["billing", "bug", "praise"]
    assert m["n_train"] + m["n_holdout"] == 90 and m["n_holdout"] == 18
    assert m["accuracy"] > 0.9 and m["macro_f1"] > 0.9
    assert set(m["per_class"]) == {"billing", "bug", "praise"}
    assert all(c["support"] > 0 for c in m["per_class"].values())  # stratified: every class held out
    assert {"precision", "recall", "f1", "support"} <= set(m["per_class"]["bug"])
    assert m["absent_from_holdout"] == [] and isinstance(m["fit_warnings"], list)
    assert trained.report is not None and trained.report.per_class["bug"] == 30


def test_holdout_is_at_least_one_per_class(make_clusters, seed):
    X, y = make_clusters({c: 2 for c in "abcde"})
    m = train_head(X, _examples(y), seed=seed).metrics
    assert m["n_holdout"] == 5 and all(c["support"] == 1 for c in m["per_class"].values())


def test_shipped_head_is_the_measured_one(make_clusters, seed):
    """Same seed, same split, same weights; metrics recomputed from the head agree."""
    X, y = make_clusters({"a": 20, "b": 20}, noise=0.3)
    first, second = (train_head(X, _examples(y), seed=seed) for _ in range(2))
    assert first.head == second.head and first.metrics == second.metrics


def test_multi_label_training(make_multilabel, seed):
    X, sets = make_multilabel(["legal", "urgent", "vip"], 120)
    for kind in ("logreg", "mlp"):
        trained = train_head(X, _examples(sets), kind=kind, seed=seed)
        assert trained.head.multi_label and trained.head.labels == ["legal", "urgent", "vip"]
        m = trained.metrics
        assert m["n_holdout"] == 24 and m["micro_f1"] > 0.9 and m["label_accuracy"] > 0.9
        fleet = HeadFleet()
        fleet.add("k", trained.head)
        np.testing.assert_allclose(fleet.predict(X, ["k"]).for_head(0), trained.head.predict_proba(X), atol=1e-5)


def test_risky_data_warns_and_still_trains(make_clusters, seed):
    X, y = make_clusters({"common": 60, "rare": 3})  # 20:1, and only 3 examples of 'rare'
    texts = [f"text {i}" for i in range(len(y))]
    common = [i for i, label in enumerate(y) if label == "common"]
    rare = [i for i, label in enumerate(y) if label == "rare"]
    texts[common[1]] = texts[common[0]]  # duplicate row
    texts[rare[0]] = texts[common[2]]  # same text, conflicting label
    ex = examples_from_records(list(zip(texts, y)))
    report = validate(ex)
    joined = " ".join(report.warnings)
    assert report.duplicates == 1 and report.conflicting == 1
    assert "imbalance 20.0:1" in joined and "few examples" in joined and "different labels" in joined
    trained = train_head(X, ex, seed=seed, report=report)
    assert trained.report is report
    assert trained.metrics["n_holdout"] == 13 and trained.metrics["per_class"]["rare"]["support"] == 1


def test_bad_inputs_are_refused(make_clusters):
    X, y = make_clusters({"a": 5, "b": 5})
    ex = _examples(y)
    with pytest.raises(ValidationError, match="kind"):
        train_head(X, ex, kind="svm")
    with pytest.raises(ValidationError, match="shape"):
        train_head(X[:4], ex)
    with pytest.raises(ValidationError, match="holdout"):
        train_head(X, ex, holdout=1.0)
    with pytest.raises(TrainingDataError, match="only one class"):
        train_head(X, _examples(["a"] * 10))


def test_no_holdout_trains_on_everything(make_clusters):
    X, y = make_clusters({"a": 5, "b": 5})
    m = train_head(X, _examples(y), holdout=0.0).metrics
    assert m["n_train"] == 10 and m["n_holdout"] == 0 and "accuracy" not in m


def test_refit_ships_a_head_trained_on_every_example(seed):
    from headfleet.heads import examples_from_records, train_head

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, 16))
    X = np.concatenate([centers[0] + 0.3 * rng.normal(size=(10, 16)), centers[1] + 0.3 * rng.normal(size=(10, 16))])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    ex = examples_from_records([{"text": f"t{i}", "label": "ab"[i // 10]} for i in range(20)])
    split = train_head(X, ex, seed=seed)
    shipped = train_head(X, ex, seed=seed, refit=True)
    assert split.metrics["n_shipped"] == split.metrics["n_train"] < 20
    assert shipped.metrics["n_shipped"] == 20
    assert shipped.metrics["accuracy"] == split.metrics["accuracy"]  # the holdout figure is the split model's
    assert not np.allclose(shipped.head.W1, split.head.W1)


def test_an_mlp_head_is_bit_identical_whatever_blas_threads_the_process_has():
    """The weights ``backbone apply`` and ``reproduce`` compare by hash: the same data and seed give
    the same bytes whether BLAS has two threads or one at the time (OpenBLAS hands a call made
    while another thread uses it fewer threads, and fewer threads give other bits)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(7)
    X = rng.standard_normal((240, 384)).astype(np.float32)
    labels = ["a" if v > 0 else "b" for v in X[:, 0] + 0.5 * X[:, 1]]
    examples = examples_from_records([{"text": f"t{i}", "label": lab} for i, lab in enumerate(labels)])
    with threadpool_limits(limits=2, user_api="blas"):
        two = train_head(X, examples, kind="mlp", seed=3, refit=True).head
    with threadpool_limits(limits=1, user_api="blas"):
        one = train_head(X, examples, kind="mlp", seed=3, refit=True).head
    for name in ("W1", "b1", "W2", "b2"):
        assert getattr(two, name).tobytes() == getattr(one, name).tobytes(), name
