"""A/B experiment statistics: every figure against scipy on the same numbers, error rates over
seeded simulations within binomial bounds, and None (never NaN) where a figure is undefined.

Simulated outcomes are normal (revenue-like) or 0/1 conversions; the statistics only see 1-D
float arrays. The rate tests bound a count of seeded runs by scipy's binomial quantiles at
99.9%, so each holds for these seeds and would fail a real regression by a wide margin.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom, chisquare, norm, ttest_ind

from headfleet.errors import ValidationError
from headfleet.lifecycle.experiment_stats import (
    ALPHA,
    MSPRT_TAU_SD,
    SRM_ALPHA,
    arm_summary,
    compare,
    lift,
    msprt_p,
    srm_p,
    welch,
)

RUNS = 200
PEEK_EVERY = 50
HORIZON = 2000


def _json(d: dict) -> str:
    return json.dumps(d, allow_nan=False)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture
def unequal(rng) -> tuple[np.ndarray, np.ndarray]:
    """Arms of different sizes and spreads: where Welch and Student's pooled test part ways."""
    control = rng.normal(10.0, 1.0, size=400)
    treatment = rng.normal(10.25, 4.0, size=60)
    return control, treatment


# --- agreement with scipy ---------------------------------------------------------------------------
def test_arm_summary_matches_numpy(rng):
    x = rng.exponential(3.0, size=37)
    s = arm_summary(x)
    assert s["n_units"] == 37
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["variance"] == pytest.approx(np.var(x, ddof=1), rel=1e-12)
    assert arm_summary([]) == {"n_units": 0, "mean": None, "variance": None}
    assert arm_summary([4.0]) == {"n_units": 1, "mean": 4.0, "variance": None}


def test_welch_equals_scipy_and_differs_from_student(unequal):
    control, treatment = unequal
    ref = ttest_ind(treatment, control, equal_var=False)
    student = ttest_ind(treatment, control, equal_var=True)
    w = welch(control, treatment)
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert w["df"] == pytest.approx(ref.df, rel=1e-12)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert w["t"] > 0  # treatment's mean is the higher one
    assert w["t"] == pytest.approx(-welch(treatment, control)["t"], rel=1e-12)
    # a regression to the pooled test would fail here
    assert abs(w["df"] - student.df) > 100
    assert abs(w["p"] - student.pvalue) > 0.1 * student.pvalue
    assert abs(w["t"] - student.statistic) > 0.1 * abs(student.statistic)


def test_lift_and_interval_equal_scipy_and_differ_from_student(unequal):
    control, treatment = unequal
    ref = ttest_ind(treatment, control, equal_var=False)
    student = ttest_ind(treatment, control, equal_var=True).confidence_interval(0.95)
    out = lift(control, treatment)
    assert out["lift"] == pytest.approx(treatment.mean() - control.mean(), rel=1e-12)
    assert out["relative_lift"] == pytest.approx(out["lift"] / control.mean(), rel=1e-12)
    lo, hi = ref.confidence_interval(confidence_level=0.95)
    assert out["ci95"] == pytest.approx([lo, hi], rel=1e-12)
    assert lo < out["lift"] < hi
    assert abs((hi - lo) - (student.high - student.low)) > 0.1 * (student.high - student.low)
    lo90, hi90 = ref.confidence_interval(confidence_level=0.9)
    assert lift(control, treatment, level=0.9)["ci95"] == pytest.approx([lo90, hi90], rel=1e-12)


@pytest.mark.parametrize("n_c, n_t, split", [(1000, 1200, 0.5), (500, 500, 0.5), (800, 200, 0.2), (3, 0, 0.5), (0, 7, 0.9)])
def test_srm_p_equals_scipy_chisquare(n_c, n_t, split):
    total = n_c + n_t
    ref = chisquare([n_c, n_t], f_exp=[total * (1 - split), total * split]).pvalue
    assert srm_p(n_c, n_t, split) == pytest.approx(ref, rel=1e-12)


def test_compare_figures_equal_the_single_functions(unequal):
    control, treatment = unequal
    out = compare(control, treatment, split=60 / 460, min_samples=50, sequential=False)
    assert out["arms"] == {"control": arm_summary(control), "treatment": arm_summary(treatment)}
    assert out["welch"] == welch(control, treatment)
    ref_lift = lift(control, treatment)
    assert (out["lift"], out["relative_lift"], out["ci95"]) == (ref_lift["lift"], ref_lift["relative_lift"], ref_lift["ci95"])
    assert out["srm_p"] == srm_p(400, 60, 60 / 460)
    assert out["sequential_p"] is None
    assert out["p"] == out["welch"]["p"]
    seq = compare(control, treatment, split=60 / 460, min_samples=50, sequential=True)
    assert seq["sequential_p"] == msprt_p(control, treatment)
    assert seq["p"] == seq["sequential_p"]
    _json(out), _json(seq)


# --- the mSPRT statistic ----------------------------------------------------------------------------
def test_msprt_is_the_normal_mixture_bayes_factor(rng):
    """1/p = N(d; 0, V + tau^2) / N(d; 0, V), evaluated by scipy's normal density on another path."""
    for n_c, n_t, shift in [(300, 500, 0.05), (1000, 1000, 0.0), (40, 2000, 0.3)]:
        c = rng.normal(1.0, 2.0, size=n_c)
        t = rng.normal(1.0 + shift, 3.0, size=n_t)
        v = c.var(ddof=1) / n_c + t.var(ddof=1) / n_t
        pooled = ((n_c - 1) * c.var(ddof=1) + (n_t - 1) * t.var(ddof=1)) / (n_c + n_t - 2)
        tau = MSPRT_TAU_SD * math.sqrt(pooled)
        d = t.mean() - c.mean()
        bayes_factor = norm.pdf(d, scale=math.sqrt(v + tau**2)) / norm.pdf(d, scale=math.sqrt(v))
        assert msprt_p(c, t) == pytest.approx(min(1.0, 1.0 / bayes_factor), rel=1e-9)


def test_msprt_equal_arms_reduce_to_the_papers_normal_statistic(rng):
    """Johari et al.: with n per arm, Lambda = sqrt(2s^2/(2s^2+n tau^2)) exp(n^2 tau^2 d^2 / (4 s^2 (2 s^2 + n tau^2)))."""
    n = 800
    c = rng.normal(0.0, 1.0, size=n)
    t = c[::-1] * 1.0 + 0.08  # same sample variance in both arms, so s^2 is unambiguous
    s2 = c.var(ddof=1)
    tau2 = 0.3**2 * s2
    d = t.mean() - c.mean()
    lam = math.sqrt(2 * s2 / (2 * s2 + n * tau2)) * math.exp(n**2 * tau2 * d**2 / (4 * s2 * (2 * s2 + n * tau2)))
    assert msprt_p(c, t, tau_sd=0.3) == pytest.approx(min(1.0, 1 / lam), rel=1e-9)


def test_msprt_is_unchanged_by_the_outcomes_units(rng):
    c, t = rng.normal(5, 1, 700), rng.normal(5.1, 1.2, 900)
    assert msprt_p(c * 1000 + 7, t * 1000 + 7) == pytest.approx(msprt_p(c, t), rel=1e-9)


def test_msprt_huge_evidence_gives_zero_not_overflow():
    c = np.tile([0.0, 1.0], 50_000)
    t = c + 1.0
    assert msprt_p(c, t) == 0.0


# --- decisions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequential", [False, True])
def test_planted_lift_promotes_and_planted_loss_rolls_back(rng, sequential):
    n = 4000
    control = (rng.random(n) < 0.10).astype(float)
    better = (rng.random(n) < 0.13).astype(float)
    worse = (rng.random(n) < 0.07).astype(float)
    up = compare(control, better, split=0.5, min_samples=1000, sequential=sequential)
    down = compare(control, worse, split=0.5, min_samples=1000, sequential=sequential)
    assert up["recommendation"] == "promote", up["reason"]
    assert up["lift"] > 0 and up["p"] < ALPHA and up["ci95"][0] > 0
    assert down["recommendation"] == "rollback", down["reason"]
    assert down["lift"] < 0 and down["p"] < ALPHA and down["ci95"][1] < 0
    assert not up["srm"] and not down["srm"]
    _json(up), _json(down)


def test_msprt_detects_a_real_lift(rng):
    c, t = rng.normal(0, 1, HORIZON), rng.normal(0.2, 1, HORIZON)
    assert msprt_p(c, t) < 0.001
    out = compare(c, t, split=0.5, min_samples=100, sequential=True)
    assert out["recommendation"] == "promote"
    # always-valid costs power: at the same data it is never smaller than Welch's p here
    assert out["sequential_p"] > out["welch"]["p"]


def test_keep_running_below_min_samples_even_with_a_large_lift(rng):
    c, t = rng.normal(0, 1, 99), rng.normal(3, 1, 300)
    for sequential in (False, True):
        out = compare(c, t, split=0.5, min_samples=100, sequential=sequential)
        assert out["recommendation"] == "keep running"
        assert "100" in out["reason"]
        assert out["p"] is not None and out["p"] < ALPHA  # the figures are still reported


def test_srm_flags_a_skewed_split_and_overrides_the_lift(rng):
    assert srm_p(1000, 1200, 0.5) < SRM_ALPHA
    c, t = rng.normal(0, 1, 1000), rng.normal(1, 1, 1200)
    out = compare(c, t, split=0.5, min_samples=100, sequential=False)
    assert out["srm"] is True
    assert out["recommendation"] == "inconclusive"
    assert "split is broken" in out["reason"] and "untrustworthy" in out["reason"]
    # the same counts fit a configured 45/55 split
    fits = compare(c, t, split=1200 / 2200, min_samples=100, sequential=False)
    assert fits["srm"] is False and fits["recommendation"] == "promote"


@pytest.mark.parametrize("split", [0.5, 0.2])
def test_srm_rarely_flags_a_fair_assignment(split):
    rng = np.random.default_rng(7)
    draws = 1000
    n_t = rng.binomial(5000, split, size=draws)
    flagged = sum(srm_p(int(5000 - k), int(k), split) < SRM_ALPHA for k in n_t)
    assert flagged <= binom.ppf(0.999, draws, SRM_ALPHA)


@pytest.mark.parametrize("sequential", [False, True])
def test_no_lift_is_inconclusive_not_keep_running(rng, sequential):
    c, t = rng.normal(0, 1, 3000), rng.normal(0, 1, 3000)
    out = compare(c, t, split=0.5, min_samples=500, sequential=sequential)
    assert out["p"] >= ALPHA
    assert out["recommendation"] == "inconclusive"


# --- error rates ------------------------------------------------------------------------------------
def test_welch_false_positive_rate_is_alpha():
    rng = np.random.default_rng(11)
    sims = 400
    hits = 0
    for _ in range(sims):
        c = rng.normal(0.0, 1.0, size=int(rng.integers(20, 200)))
        t = rng.normal(0.0, 3.0, size=int(rng.integers(20, 200)))  # unequal spread and size, true lift 0
        hits += welch(c, t)["p"] < ALPHA
    lo, hi = binom.interval(0.999, sims, ALPHA)
    assert lo <= hits <= hi


def _draw(rng, kind: str) -> np.ndarray:
    """[RUNS, HORIZON] outcomes with no lift between arms."""
    if kind == "normal":
        return rng.normal(3.0, 2.0, size=(RUNS, HORIZON))
    return (rng.random((RUNS, HORIZON)) < 0.1).astype(float)  # 10% conversion


@pytest.mark.parametrize("kind", ["normal", "conversion"])
def test_msprt_stays_valid_under_peeking_where_welch_does_not(kind):
    """Peek after every 50 units per arm up to 2000, stop at the first p < 0.05."""
    rng = np.random.default_rng({"normal": 3, "conversion": 4}[kind])
    control, treatment = _draw(rng, kind), _draw(rng, kind)
    peeks = range(PEEK_EVERY, HORIZON + 1, PEEK_EVERY)

    msprt_rejected = 0
    for c, t in zip(control, treatment):
        msprt_rejected += any((p := msprt_p(c[:n], t[:n])) is not None and p < ALPHA for n in peeks)

    # plain Welch at every peek: scipy's own test, vectorised over the runs (ttest_ind is what
    # ``welch`` wraps; the equality is tested above)
    welch_rejected = np.zeros(RUNS, dtype=bool)
    for n in peeks:
        p = ttest_ind(treatment[:, :n], control[:, :n], axis=1, equal_var=False).pvalue
        welch_rejected |= p < ALPHA

    bound = binom.ppf(0.999, RUNS, ALPHA)  # a count this high or lower is consistent with <= 5%
    assert msprt_rejected <= bound, msprt_rejected
    assert welch_rejected.sum() > bound, welch_rejected.sum()


# --- degenerate input -------------------------------------------------------------------------------
DEGENERATE = {
    "empty": ([], []),
    "one unit each": ([1.0], [0.0]),
    "one unit in control": ([1.0], [0.0, 1.0, 1.0]),
    "no conversions yet": (np.zeros(500), np.zeros(500)),
    "constant, different": (np.full(50, 2.0), np.full(60, 3.0)),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_inputs_give_none_and_valid_json(name):
    c, t = DEGENERATE[name]
    assert welch(c, t) == {"t": None, "df": None, "p": None}
    assert msprt_p(c, t) is None
    assert lift(c, t)["ci95"] is None
    for sequential in (False, True):
        out = compare(c, t, split=0.5, min_samples=0, sequential=sequential)
        assert out["p"] is None
        assert out["recommendation"] == "inconclusive"
        text = _json(out)
        assert "NaN" not in text and "Infinity" not in text


def test_lift_none_cases():
    assert lift([], [1.0, 2.0]) == {"lift": None, "relative_lift": None, "ci95": None}
    zero_mean = lift([0.0, 0.0, 0.0], [0.0, 1.0, 1.0])
    assert zero_mean["lift"] == pytest.approx(2 / 3)
    assert zero_mean["relative_lift"] is None
    assert zero_mean["ci95"] is not None  # one arm varies: the Welch interval exists
    assert srm_p(0, 0, 0.5) is None


def test_one_constant_arm_is_still_a_welch_test():
    c, t = np.zeros(100), np.r_[np.zeros(90), np.ones(10)]
    ref = ttest_ind(t, c, equal_var=False)
    assert welch(c, t)["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert welch(c, t)["df"] == pytest.approx(99.0)


def test_results_are_plain_python_types(unequal):
    out = compare(*unequal, split=0.5, min_samples=10, sequential=True)

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or type(v) in (bool, int, float, str), (v, type(v))

    walk(out)
    assert json.loads(_json(out)) == out


# --- malformed input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda: welch([1.0, float("nan")], [1.0, 2.0]),
        lambda: msprt_p([1.0, 2.0], [1.0, float("inf")]),
        lambda: arm_summary(np.zeros((3, 2))),
        lambda: arm_summary(["a", "b"]),
        lambda: msprt_p([1.0, 2.0], [1.0, 2.0], tau_sd=0.0),
        lambda: lift([1.0, 2.0], [1.0, 2.0], level=1.0),
        lambda: srm_p(-1, 5, 0.5),
        lambda: srm_p(5, 5, 1.0),
        lambda: srm_p(5, 5, 0.0),
        lambda: compare([1.0, 2.0], [1.0, 2.0], split=0.5, min_samples=-1, sequential=False),
        lambda: compare([1.0, 2.0], [1.0, 2.0], split=0.5, min_samples=1, sequential=False, alpha=0.0),
    ],
)
def test_malformed_input_raises_validation_error(call):
    with pytest.raises(ValidationError):
        call()
