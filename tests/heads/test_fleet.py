"""HeadFleet: batched fan-out over stacked heads equals each head's own sklearn model."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import MultiLabelBinarizer

from headfleet.errors import NotFoundError, ValidationError
from headfleet.heads import HeadArrays, HeadFleet


@pytest.fixture(scope="module")
def models(make_clusters, make_multilabel, seed) -> dict[str, object]:
    """Five fitted sklearn heads of every supported shape, keyed like fleet entries."""
    out: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X, y = make_clusters({"ham": 25, "spam": 25}, noise=0.08, salt=1)
        out["t1/spam@1"] = LogisticRegression(max_iter=2000).fit(X, y)
        X, y = make_clusters({"bug": 20, "feature": 20, "question": 20}, noise=0.08, salt=2)
        out["t1/topic@2"] = LogisticRegression(max_iter=2000).fit(X, y)
        X, sets = make_multilabel(["billing", "legal", "urgent", "vip"], 80, salt=3)
        Y = MultiLabelBinarizer(classes=["billing", "legal", "urgent", "vip"]).fit_transform(sets)
        out["t2/tags@1"] = OneVsRestClassifier(LogisticRegression()).fit(X, Y)
        X, y = make_clusters({"no": 25, "yes": 25}, noise=0.08, salt=4)
        out["t2/mlp-bin@1"] = MLPClassifier((32,), max_iter=200, random_state=seed).fit(X, y)
        X, y = make_clusters({"neg": 20, "neu": 20, "pos": 20}, noise=0.08, salt=5)
        out["t3/mlp-3@7"] = MLPClassifier((48,), max_iter=200, random_state=seed).fit(X, y)
    return out


def _label_names(model) -> list[str] | None:
    return ["billing", "legal", "urgent", "vip"] if isinstance(model, OneVsRestClassifier) else None


@pytest.fixture
def fleet(models) -> HeadFleet:
    fleet = HeadFleet()
    for key, model in models.items():
        fleet.add(key, HeadArrays.from_sklearn(model, labels=_label_names(model)))
    return fleet


@pytest.fixture
def queries(seed) -> np.ndarray:
    rng = np.random.default_rng(seed + 99)
    X = rng.normal(size=(37, 384))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def _check(fleet: HeadFleet, models: dict, X: np.ndarray, keys: list[str]) -> None:
    out = fleet.predict(X, keys)
    widest = max(len(fleet.get(k).labels) for k in keys)
    assert out.probs.shape == (len(X), len(keys), widest) and out.probs.dtype == np.float32
    assert out.keys == keys
    for j, key in enumerate(keys):
        expected = models[key].predict_proba(X)
        assert out.n_labels[j] == expected.shape[1]
        np.testing.assert_allclose(out.for_head(j), expected, atol=1e-5, err_msg=key)
        assert not out.probs[:, j, out.n_labels[j]:].any()  # padding stays zero
        assert out.multi_label[j] == isinstance(models[key], OneVsRestClassifier)


def test_full_set_matches_each_sklearn_model(fleet, models, queries):
    _check(fleet, models, queries, list(models))


def test_shuffled_subset_and_repeats_match(fleet, models, queries, seed):
    rng = np.random.default_rng(seed)
    keys = list(rng.permutation(list(models))[:3])
    _check(fleet, models, queries, keys)
    _check(fleet, models, queries, ["t3/mlp-3@7", "t1/spam@1", "t3/mlp-3@7"])
    _check(fleet, models, queries[:1], ["t2/tags@1"])


def test_add_and_remove_keep_results_right(fleet, models, queries, make_clusters):
    fleet.predict(queries, list(models))  # build the stacked snapshot once
    fleet.remove("t1/topic@2")
    assert "t1/topic@2" not in fleet and len(fleet) == 4
    with pytest.raises(NotFoundError):
        fleet.predict(queries, ["t1/topic@2"])
    rest = {k: m for k, m in models.items() if k != "t1/topic@2"}
    _check(fleet, rest, queries, list(rest)[::-1])

    X, y = make_clusters({c: 12 for c in "abcdef"}, noise=0.08, salt=6)  # wider than any other head
    rest["t4/six@1"] = LogisticRegression(max_iter=2000).fit(X, y)
    fleet.add("t4/six@1", HeadArrays.from_sklearn(rest["t4/six@1"]))
    _check(fleet, rest, queries, list(rest))
    _check(fleet, rest, queries, ["t1/spam@1", "t2/mlp-bin@1"])  # narrow subset: output trimmed to 2

    before = fleet.predict(queries, ["t1/spam@1"]).for_head(0)  # the key set's plan is remembered...
    fleet.add("t1/spam@1", HeadArrays.from_sklearn(rest["t2/mlp-bin@1"]))  # replace under same key
    np.testing.assert_allclose(
        fleet.predict(queries, ["t1/spam@1"]).for_head(0), rest["t2/mlp-bin@1"].predict_proba(queries), atol=1e-5
    )  # ...and forgotten with the snapshot it was made on
    assert not np.allclose(before, rest["t2/mlp-bin@1"].predict_proba(queries), atol=1e-5)


def test_reordered_requests_do_not_grow_the_fleet_by_the_heads_size(fleet, models, queries, make_clusters):
    """The fleet remembers each requested key set's plan; a plan holds indices, never a copy of
    the heads' weights, so a client that sends its classifiers in a new order each time (a list
    built from a set) costs a few bytes a plan, however wide another tenant's heads are."""
    X, y = make_clusters({f"c{i}": 4 for i in range(40)}, noise=0.08, salt=7)
    wide = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fleet.add("t9/wide@1", HeadArrays.from_sklearn(wide))
    rng = np.random.default_rng(0)
    keys = list(models)
    for _ in range(50):
        _check(fleet, models, queries[:2], list(rng.permutation(keys)))
    plans = fleet._current().plans
    assert len(plans) > 10
    held = sum(a.nbytes for plan in plans.values() for _, part in plan.parts
               for a in vars(part).values() if isinstance(a, np.ndarray))
    assert held / len(plans) < 64 * len(keys)  # bytes per plan: indices of the requested heads only


def test_top_labels(fleet, models, queries):
    keys = ["t1/topic@2", "t2/tags@1"]
    top = fleet.predict(queries, keys).top_labels()
    assert len(top) == len(queries)
    topic = models["t1/topic@2"]
    tags = models["t2/tags@1"].predict_proba(queries) >= 0.5
    names = ["billing", "legal", "urgent", "vip"]
    for i, row in enumerate(top):
        assert row[0] == topic.classes_[topic.predict_proba(queries[i : i + 1]).argmax()]
        assert row[1] == [names[c] for c in np.flatnonzero(tags[i])]


def test_errors_and_empty_requests(fleet, queries):
    with pytest.raises(NotFoundError, match="nope"):
        fleet.predict(queries, ["t1/spam@1", "nope"])
    with pytest.raises(ValidationError):
        fleet.predict(queries[:, :100], ["t1/spam@1"])
    with pytest.raises(ValidationError):
        fleet.add("small", HeadArrays("logreg", ["a", "b"], False, np.zeros((2, 8)), np.zeros(2)))
    out = fleet.predict(queries, [])
    assert out.probs.shape == (len(queries), 0, 0) and out.top_labels() == [[]] * len(queries)
    assert fleet.predict(queries[:0], ["t1/spam@1"]).probs.shape == (0, 1, 2)


def test_concurrent_predict_and_add(fleet, models, queries):
    """Readers racing writers always see a consistent fleet with correct numbers."""
    expected = {k: m.predict_proba(queries) for k, m in models.items()}
    spare = HeadArrays.from_sklearn(models["t1/spam@1"])
    errors: list[BaseException] = []
    reads: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                out = fleet.predict(queries, list(models))
                for j, key in enumerate(models):
                    np.testing.assert_allclose(out.for_head(j), expected[key], atol=1e-5)
                reads.append(1)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    cycles, alive = 0, set()
    while (cycles < 30 or len(reads) < 30) and not errors and cycles < 100_000:
        key = f"extra/{cycles}"
        fleet.add(key, spare)  # every change drops the snapshot a reader may be using
        alive.add(key)
        if cycles % 2:
            fleet.remove(key)
            alive.discard(key)
        cycles += 1
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(reads) >= 30
    assert set(fleet.keys()) == set(models) | alive
    out = fleet.predict(queries, sorted(alive)[:2])
    for j in range(2):
        np.testing.assert_allclose(out.for_head(j), expected["t1/spam@1"], atol=1e-5)
