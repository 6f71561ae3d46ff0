"""Drift statistics and the reservoir: hand-computed values, scipy/sklearn on another path, and
frequencies over many seeds within binomial tolerances.

Embeddings are synthetic unit vectors with a decaying spectrum around a common direction (what
sentence embeddings look like: anisotropic, all in one cone); the statistics only see float32
[n, 384] rows, so this exercises the same code in milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist, pdist
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from headfleet.errors import ValidationError
from headfleet.heads.metrics import classification_metrics
from headfleet.lifecycle.reservoir import Reservoir
from headfleet.lifecycle.signals import (
    DOMAIN_AUC_THRESHOLD,
    MIN_ROWS,
    PSI_MAJOR,
    PSI_MODERATE,
    CanaryScores,
    EmbeddingDrift,
    _auc,
    _pooled_gram,
    _ridge_oof,
    _stratified_folds,
    canary_scores,
    confidence_ks,
    domain_auc,
    embedding_drift,
    estimated_accuracy,
    label_js,
    mmd2,
    psi,
)

DIM = 384


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Small matrices: BLAS worker threads only spin against whatever else shares the CPU."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def embeddings(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """[n, 384] float32 unit rows; ``shift`` moves the mean along a fixed low-variance direction."""
    rng = np.random.default_rng(seed)
    scales = 0.6 / np.sqrt(np.arange(1, DIM + 1))  # a decaying spectrum
    x = rng.normal(size=(n, DIM)) * scales
    x[:, 0] += 1.0  # the common direction
    x[:, 200] += shift
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- PSI --------------------------------------------------------------------------------------------
def test_psi_hand_computed():
    # r = (0.5, 0.3, 0.2), c = (0.4, 0.3, 0.3):
    # (0.4-0.5) ln(0.8) + 0 + (0.3-0.2) ln(1.5) = 0.0223144 + 0.0405465 = 0.0628609
    assert psi({"a": 50, "b": 30, "c": 20}, {"a": 40, "b": 30, "c": 30}) == pytest.approx(0.0628609, abs=1e-6)
    # counts and proportions mix; key order does not matter; PSI is symmetric
    assert psi({"a": 0.5, "b": 0.3, "c": 0.2}, {"c": 3, "b": 3, "a": 4}) == pytest.approx(0.0628609, abs=1e-6)
    assert psi({"a": 40, "b": 30, "c": 30}, {"a": 50, "b": 30, "c": 20}) == pytest.approx(0.0628609, abs=1e-6)
    assert psi({"a": 7, "b": 3}, {"a": 70, "b": 30}) == pytest.approx(0.0, abs=1e-12)


def test_psi_clips_an_empty_category():
    # r = (1, 0 -> 1e-4), c = (0.5, 0.5):
    # (0.5-1) ln(0.5) + (0.5-1e-4) ln(0.5/1e-4) = 0.3465736 + 0.4999 * 8.5171932 = 4.6043185
    assert psi({"a": 10}, {"a": 5, "b": 5}) == pytest.approx(4.6043185, abs=1e-6)
    # a larger eps: (0.5-1) ln(0.5) + (0.5-0.01) ln(50) = 0.3465736 + 0.49 * 3.9120230 = 2.2634649
    assert psi({"a": 10}, {"a": 5, "b": 5}, eps=0.01) == pytest.approx(2.2634649, abs=1e-6)


def test_psi_bands_and_edge_cases():
    assert 0 < PSI_MODERATE < PSI_MAJOR
    assert psi({}, {"a": 1}) is None and psi({"a": 0}, {"a": 1}) is None and psi({"a": 1}, {}) is None
    with pytest.raises(ValidationError):
        psi({"a": -1, "b": 2}, {"a": 1})
    with pytest.raises(ValidationError):
        psi({"a": float("nan")}, {"a": 1})


# --- Jensen-Shannon ---------------------------------------------------------------------------------
def test_label_js_hand_computed():
    assert label_js({"a": 3}, {"b": 9}) == pytest.approx(1.0)  # disjoint
    assert label_js({"a": 1, "b": 2}, {"a": 10, "b": 20}) == pytest.approx(0.0, abs=1e-7)
    # p = (0.5, 0.5), q = (1, 0), m = (0.75, 0.25):
    # KL(p||m) = 0.5 log2(2/3) + 0.5 log2(2) = 0.2075187; KL(q||m) = log2(4/3) = 0.4150375
    # JSD = (0.2075187 + 0.4150375) / 2 = 0.3112781; distance = sqrt = 0.5579230
    assert label_js({"a": 1, "b": 1}, {"a": 5}) == pytest.approx(0.5579230, abs=1e-6)
    assert label_js({}, {"a": 1}) is None


# --- confidences ------------------------------------------------------------------------------------
def test_confidence_ks_values():
    x = np.array([0.1, 0.2, 0.3, 0.4])
    assert confidence_ks(x, x.copy()) == 0.0
    # F_ref steps at 0.1..0.4, F_cur at 0.3..0.6; at 0.2: 0.5 vs 0, at 0.4: 1 vs 0.5 -> D = 0.5
    assert confidence_ks(x, np.array([0.3, 0.4, 0.5, 0.6])) == pytest.approx(0.5)
    assert confidence_ks(x, np.array([0.5, 0.6, 0.7, 0.8])) == pytest.approx(1.0)
    # [n, labels] probabilities: row maxima (0.9, 0.6) vs (0.9, 0.6)
    probs = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert confidence_ks(probs, np.array([0.6, 0.9])) == 0.0


def test_confidence_ks_empty_and_invalid():
    assert confidence_ks(np.array([]), np.array([0.5])) is None
    assert confidence_ks(np.array([0.5]), np.empty((0, 3))) is None
    with pytest.raises(ValidationError):
        confidence_ks(np.array([0.5, np.nan]), np.array([0.5]))
    with pytest.raises(ValidationError):
        confidence_ks(np.array([1.5]), np.array([0.5]))


def test_estimated_accuracy():
    assert estimated_accuracy(np.array([0.9, 0.6, 0.75])) == pytest.approx(0.75)
    assert estimated_accuracy(np.array([[0.7, 0.3], [0.2, 0.8]])) == pytest.approx(0.75)
    assert estimated_accuracy(np.array([])) is None


def test_estimated_accuracy_matches_a_calibrated_head():
    # a calibrated head: each prediction is right with probability equal to its confidence
    rng = np.random.default_rng(7)
    p = rng.uniform(0.4, 1.0, size=20_000)
    correct = rng.random(p.size) < p
    sd = math.sqrt(np.mean(p * (1 - p)) / p.size)
    assert estimated_accuracy(p) == pytest.approx(correct.mean(), abs=5 * sd)
    # an over-confident head (right only p - 0.2 of the time) is caught by the same comparison
    assert abs(estimated_accuracy(p) - (rng.random(p.size) < p - 0.2).mean()) > 20 * sd


# --- domain classifier ------------------------------------------------------------------------------
def test_ridge_oof_equals_sklearn_ridge():
    x = np.vstack([embeddings(60, seed=1), embeddings(45, shift=0.3, seed=2)])
    y = np.r_[np.zeros(60), np.ones(45)]
    fold = _stratified_folds(y, 3, np.random.default_rng(0))
    gram, _ = _pooled_gram(x[:60], x[60:], max_rows=500, seed=0)
    ours = _ridge_oof(gram, y, fold, alpha=1.0)
    theirs = np.empty_like(ours)
    for f in range(3):
        tr, te = fold != f, fold == f
        theirs[te] = Ridge(alpha=1.0).fit(x[tr].astype(np.float64), 2 * y[tr] - 1).predict(x[te].astype(np.float64))
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_stratified_folds_balance_each_class():
    y = np.r_[np.zeros(200), np.ones(37)]
    fold = _stratified_folds(y, 3, np.random.default_rng(5))
    for cls, size in ((0, 200), (1, 37)):
        counts = np.bincount(fold[y == cls], minlength=3)
        assert counts.sum() == size and counts.max() - counts.min() <= 1


def test_auc_by_ranks_equals_roc_auc_score():
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.4).astype(float)
    score = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties
    assert _auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("n, m", [(200, 200), (300, 120)])
def test_domain_auc_same_distribution_is_chance(n, m):
    # one window's AUC under no drift has a standard deviation of about 0.04 at these sizes
    aucs = [domain_auc(embeddings(n, seed=s), embeddings(m, seed=100 + s), seed=s) for s in range(8)]
    assert all(abs(a - 0.5) < 0.15 for a in aucs), aucs
    assert abs(np.mean(aucs) - 0.5) < 0.04, aucs


@pytest.mark.parametrize("n, m", [(200, 200), (300, 120)])
def test_domain_auc_sees_a_shifted_mean(n, m):
    auc = domain_auc(embeddings(n, seed=1), embeddings(m, shift=0.25, seed=2))
    assert auc > 0.9
    assert auc > DOMAIN_AUC_THRESHOLD


def test_domain_auc_deterministic_and_guarded():
    a, b = embeddings(150, seed=1), embeddings(150, shift=0.05, seed=2)
    assert domain_auc(a, b, seed=3) == domain_auc(a, b, seed=3)
    assert domain_auc(a[: MIN_ROWS - 1], b) is None and domain_auc(a, b[:0]) is None
    with pytest.raises(ValidationError):
        domain_auc(a, b[:, :100])
    with pytest.raises(ValidationError):
        domain_auc(a[0], b)
    with pytest.raises(ValidationError):
        domain_auc(a, b, folds=1)
    with pytest.raises(ValidationError):
        domain_auc(a, b, max_rows=MIN_ROWS - 1)
    # sides above max_rows are subsampled, deterministically
    big = embeddings(900, seed=4)
    assert domain_auc(big, b, max_rows=200, seed=1) == domain_auc(big, b, max_rows=200, seed=1)


# --- MMD --------------------------------------------------------------------------------------------
def mmd2_by_cdist(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. 2012 eq. (3) written out with scipy's distances."""
    s = np.median(pdist(np.vstack([x, y]).astype(np.float64)))
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * s * s))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean())


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.4])
def test_mmd2_equals_the_formula_by_cdist(shift):
    x, y = embeddings(120, seed=1), embeddings(90, shift=shift, seed=2)
    assert mmd2(x, y) == pytest.approx(mmd2_by_cdist(x, y), abs=2e-5)


def test_mmd2_near_zero_for_one_distribution_clearly_positive_for_a_shift():
    same = [mmd2(embeddings(200, seed=s), embeddings(200, seed=50 + s)) for s in range(4)]
    shifted = mmd2(embeddings(200, seed=1), embeddings(200, shift=0.5, seed=2))
    assert max(abs(v) for v in same) < 2e-3, same  # the null's standard deviation is about 6e-4 here
    assert shifted > 10 * max(abs(v) for v in same) and shifted > 0.01, (shifted, same)


def test_mmd2_degenerate_bandwidth_and_guards():
    # 20 copies of one point vs 10 of another: 235 of 435 pairs coincide, so the median distance
    # is 0 and the bandwidth is the median non-zero distance d; k(x, y) = exp(-1/2) across:
    # MMD2_u = 1 + 1 - 2 exp(-1/2) = 0.7869387
    p, q = np.zeros((20, 4)), np.zeros((10, 4))
    p[:, 0], q[:, 1] = 1.0, 1.0
    assert mmd2(p, q) == pytest.approx(0.7869387, abs=1e-6)
    assert mmd2(p, p[:10]) == 0.0  # one point on both sides
    assert mmd2(p[:9], q) is None
    with pytest.raises(ValidationError):
        mmd2(p, np.full((10, 4), np.inf))


def test_embedding_drift_equals_the_two_calls():
    a, b = embeddings(130, seed=1), embeddings(110, shift=0.1, seed=2)
    both = embedding_drift(a, b, seed=2)
    assert both == EmbeddingDrift(domain_auc(a, b, seed=2), mmd2(a, b, seed=2))
    assert embedding_drift(a[:5], b) == EmbeddingDrift(None, None)


# --- canary -----------------------------------------------------------------------------------------
def test_canary_single_label_hand_computed():
    # a: P 1/1, R 1/2 -> F1 2/3; b: P 1/2, R 1/1 -> 2/3; c: 1; d is absent from the canary set
    scores = canary_scores(["a", "a", "b", "c"], ["a", "b", "b", "c"], ["a", "b", "c", "d"])
    assert scores == CanaryScores(accuracy=0.75, macro_f1=pytest.approx((2 / 3 + 2 / 3 + 1) / 3))
    accuracy, macro_f1 = scores  # unpacks as a pair
    # the same rule as the holdout metrics in head manifests
    idx = {"a": 0, "b": 1, "c": 2, "d": 3}
    ref = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), list(idx), multi_label=False)
    assert (accuracy, macro_f1) == pytest.approx((ref["accuracy"], ref["macro_f1"]))


def test_canary_multi_label_subset_accuracy():
    # rows: {a} vs {a} exact; {a, b} vs {a} not; {} vs {b} not -> subset accuracy 1/3
    # a: TP 2, FP 0, FN 0 -> F1 1; b: TP 0, FP 1, FN 1 -> 0; c absent -> macro (1 + 0) / 2
    scores = canary_scores([{"a"}, ["a", "b"], set()], [("a",), {"a"}, {"b"}], ["a", "b", "c"], multi_label=True)
    assert scores.accuracy == pytest.approx(1 / 3) and scores.macro_f1 == pytest.approx(0.5)
    assert canary_scores([set()], [set()], ["a"], multi_label=True) == CanaryScores(1.0, 0.0)
    # multi_label=None (the default) tells the kinds apart by the rows
    assert canary_scores([{"a"}, ["a", "b"], set()], [("a",), {"a"}, {"b"}], ["a", "b", "c"]) == scores
    assert canary_scores([[]], [[]], ["a"]) == CanaryScores(1.0, 0.0)


def test_canary_refusals():
    assert canary_scores([], [], ["a"]) is None
    with pytest.raises(ValidationError):
        canary_scores(["a"], ["a", "b"], ["a", "b"])
    with pytest.raises(ValidationError):
        canary_scores(["a"], ["z"], ["a", "b"])
    with pytest.raises(ValidationError):
        canary_scores(["ab"], [{"a"}], ["a", "b"], multi_label=True)
    with pytest.raises(ValidationError):
        canary_scores(["a"], [{"a"}], ["a", "b"])  # a mix of both kinds
    with pytest.raises(ValidationError):
        canary_scores([["a"]], [["a"]], ["a", "b"], multi_label=False)
    with pytest.raises(ValidationError):
        canary_scores([{"a"}], [{"q"}], ["a", "b"], multi_label=True)


# --- reservoir --------------------------------------------------------------------------------------
def fill(res: Reservoir, ids: np.ndarray, batches: list[int], rng: np.random.Generator) -> Reservoir:
    start = 0
    for b in batches:
        res.add(ids[start : start + b], rng)
        start += b
    assert start == len(ids)
    return res


def inclusion(make, n_ids: int, runs: int) -> np.ndarray:
    hits = np.zeros(n_ids)
    for seed in range(runs):
        sample = make(np.random.default_rng(seed))
        assert len(np.unique(sample)) == len(sample)  # without replacement
        hits[sample.astype(np.int64)] += 1
    return hits / runs


def assert_uniform(freq: np.ndarray, p: float, runs: int) -> None:
    sd = math.sqrt(p * (1 - p) / runs)
    assert np.abs(freq - p).max() < 4.5 * sd, (freq.min(), freq.max(), p)
    # the first and last tenth of the stream on average (catches a few-percent bias)
    tenth = max(1, len(freq) // 10)
    # (inclusions of distinct rows are negatively correlated: the sample size is fixed)
    assert abs(freq[:tenth].mean() - p) < 4.5 * sd / math.sqrt(tenth)
    assert abs(freq[-tenth:].mean() - p) < 4.5 * sd / math.sqrt(tenth)


@pytest.mark.parametrize("batches, runs", [([60], 2000), ([1] * 60, 300), ([7, 3, 20, 11, 19], 2000)])
def test_reservoir_is_a_uniform_sample(batches, runs):
    k, n = 10, 60
    ids = np.arange(n, dtype=np.float64)
    freq = inclusion(lambda rng: fill(Reservoir(k), ids, batches, rng).sample, n, runs)
    assert_uniform(freq, k / n, runs)


def test_reservoir_rows_and_bookkeeping():
    res = Reservoir(8, dim=3)
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    res.add(rows, np.random.default_rng(0))
    assert res.seen == 5 and len(res) == 5
    np.testing.assert_array_equal(res.sample, rows)  # below capacity: everything, in order
    res.add(np.repeat(np.arange(5, 40, dtype=np.float32)[:, None], 3, axis=1), np.random.default_rng(0))
    assert res.seen == 40 and len(res) == 8 and res.sample.shape == (8, 3) and res.sample.dtype == np.float32
    assert (res.sample[:, 0] == res.sample[:, 2]).all()  # whole rows move together
    again = Reservoir(8, dim=3)
    again.add(rows, np.random.default_rng(0))
    again.add(np.repeat(np.arange(5, 40, dtype=np.float32)[:, None], 3, axis=1), np.random.default_rng(0))
    np.testing.assert_array_equal(again.sample, res.sample)  # deterministic given the rng
    with pytest.raises(ValidationError):
        res.add(np.zeros((2, 4)), np.random.default_rng(0))
    with pytest.raises(ValidationError):
        res.add(np.array([[np.nan, 0, 0]]), np.random.default_rng(0))
    with pytest.raises(ValidationError):
        Reservoir(0)


def test_merge_weights_by_seen():
    # A saw 0..899, B saw 900..999; a merged sample of 50 holds on average 45 of A's
    runs, k = 400, 50
    from_b = []
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        a = fill(Reservoir(k), np.arange(900.0), [900], rng)
        b = fill(Reservoir(k), np.arange(900.0, 1000.0), [100], rng)
        merged = a.merge(b, rng)
        assert merged.seen == 1000 and len(merged) == k
        from_b.append(int((merged.sample >= 900).sum()))
    var = k * 0.1 * 0.9 * (1000 - k) / (1000 - 1)  # hypergeometric
    assert np.mean(from_b) == pytest.approx(5.0, abs=4.5 * math.sqrt(var / runs))


def test_merge_is_a_uniform_sample_of_the_union_and_sampling_goes_on():
    # A saw 30 (< capacity: all held), B saw 200; merged, then 70 more rows added: each of the
    # 300 rows is held with probability 40/300
    runs, k = 1200, 40

    def make(rng):
        a = fill(Reservoir(k), np.arange(30.0), [30], rng)
        b = fill(Reservoir(k), np.arange(30.0, 230.0), [13, 187], rng)
        merged = a.merge(b, rng)
        merged.add(np.arange(230.0, 300.0), rng)
        return merged.sample

    assert_uniform(inclusion(make, 300, runs), k / 300, runs)


def test_merge_small_and_mismatched():
    rng = np.random.default_rng(0)
    a = fill(Reservoir(10, dim=2), np.ones((3, 2)), [3], rng)
    b = fill(Reservoir(10, dim=2), np.zeros((4, 2)), [4], rng)
    merged = a.merge(b, rng)
    assert merged.seen == 7 and sorted(merged.sample[:, 0]) == [0, 0, 0, 0, 1, 1, 1]
    assert a.seen == 3 and len(b) == 4  # inputs unchanged
    assert len(Reservoir(5).merge(Reservoir(5), rng)) == 0
    with pytest.raises(ValidationError):
        a.merge(Reservoir(11, dim=2), rng)
    with pytest.raises(ValidationError):
        a.merge(Reservoir(10, dim=3), rng)


@pytest.mark.parametrize("dim", [None, 384])
def test_reservoir_bytes_round_trip(dim):
    rng = np.random.default_rng(0)
    res = Reservoir(50, dim=dim)
    rows = rng.normal(size=(120,) if dim is None else (120, dim))
    res.add(rows, rng)
    data = res.to_bytes()
    assert len(data) == 24 + 50 * (dim or 1) * 4
    back = Reservoir.from_bytes(data)
    assert (back.capacity, back.dim, back.seen) == (50, dim, 120)
    np.testing.assert_array_equal(back.sample, res.sample)
    half = Reservoir.from_bytes(res.to_bytes(half=True))
    assert len(res.to_bytes(half=True)) == 24 + 50 * (dim or 1) * 2
    np.testing.assert_allclose(half.sample, res.sample, rtol=2**-11, atol=2**-24)
    assert half.sample.dtype == np.float32
    # a round-tripped reservoir keeps sampling like the original
    res.add(rows, np.random.default_rng(9))
    back.add(rows, np.random.default_rng(9))
    np.testing.assert_array_equal(back.sample, res.sample)


def test_reservoir_bytes_refusals():
    res = Reservoir(4)
    res.add(np.array([1.0, 2.0, 1e6]), np.random.default_rng(0))
    data = res.to_bytes()
    assert Reservoir.from_bytes(Reservoir(4).to_bytes()).seen == 0
    for bad in (data[:-1], data + b"\0", b"XXXX" + data[4:], data[:10]):
        with pytest.raises(ValidationError):
            Reservoir.from_bytes(bad)
    with pytest.raises(ValidationError):
        res.to_bytes(half=True)  # 1e6 does not fit float16


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_canary_scores_equal_sklearns_on_random_rows(seed, multi):
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c", "d", "e"][: 2 + seed % 4]
    n = int(rng.integers(1, 40))
    if multi:
        def draw():
            return [lab for lab in labels if rng.random() < 0.4]
    else:
        def draw():
            return labels[int(rng.integers(0, len(labels) - 1))]  # the last label never occurs in truth
    truth, pred = [draw() for _ in range(n)], [draw() if rng.random() < 0.5 else None for _ in range(n)]
    pred = [p if p is not None else t for p, t in zip(pred, truth)]
    got = canary_scores(truth, pred, labels, multi_label=multi)
    if multi:
        mlb = MultiLabelBinarizer(classes=labels)
        t, p = mlb.fit_transform(truth), mlb.transform(pred)
        present = np.flatnonzero(t.sum(axis=0) > 0).tolist()
    else:
        t, p = np.array(truth, dtype=object), np.array(pred, dtype=object)
        present = [lab for lab in labels if lab in set(truth)]
    f1 = f1_score(t, p, labels=present, average="macro", zero_division=0) if present else 0.0
    assert got.accuracy == pytest.approx(accuracy_score(t, p)) and got.macro_f1 == pytest.approx(f1)
