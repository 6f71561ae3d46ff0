"""The statistics of one A/B experiment, control vs treatment classifier version: pure functions.

Input is one outcome per unit and arm (a 1-D array: conversion 0/1, revenue, ...); output is a
plain dict of Python floats, ints, bools and strings that ``json.dumps(..., allow_nan=False)``
accepts. A figure that is undefined is None, never NaN or inf: fewer than 2 units in an arm (no
variance), zero variance in both arms (no standard error), a control mean of 0 (no relative
lift), no units at all (no sample ratio). Malformed input (not 1-D, non-finite values, a split
outside (0, 1), negative counts) raises ``ValidationError``.

    figure          what                                          from
    arm_summary     units, mean, variance (ddof=1) of one arm     numpy
    welch           t, df, p of treatment vs control              scipy.stats.ttest_ind(equal_var=False)
    lift            mean_t - mean_c, relative, Welch CI           scipy's TtestResult.confidence_interval
    srm_p           sample ratio mismatch p-value                 scipy.stats.chisquare
    msprt_p         always-valid p-value under peeking            mixture SPRT, Johari et al. 2022
    compare         all of the above and a recommendation

Decision rule of ``compare`` (p is ``msprt_p`` when ``sequential`` else Welch's p):

    if n_control < min_samples or n_treatment < min_samples:  "keep running"
    elif srm_p < SRM_ALPHA:                                  "inconclusive"  (broken split)
    elif p < alpha and lift > 0:                             "promote"
    elif p < alpha and lift < 0:                             "rollback"
    else:                                                    "inconclusive"

Welch's p is valid when it is read once, at a sample size fixed in advance; reading it after
every batch and stopping at the first p < alpha rejects a true null far more often than alpha.
``msprt_p`` is the p-value to use when the experiment is watched as it runs (``sequential``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import chisquare, ttest_ind

from headfleet.errors import ValidationError

ALPHA = 0.05
SRM_ALPHA = 0.001  # the customary SRM threshold: Fabijan et al., "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments", KDD 2019
MSPRT_TAU_SD = 0.1  # mixing sd of the mSPRT normal prior, in units of the pooled outcome sd
CI_LEVEL = 0.95  # the interval ``compare`` reports as "ci95"


# --- input ------------------------------------------------------------------------------------------
def _values(values, name: str) -> np.ndarray:
    """``values`` as a float64 [n] array; ``ValidationError`` if not 1-D or not finite."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{name}: outcomes must be numbers ({exc})", param=name) from None
    if x.ndim != 1:
        raise ValidationError(f"{name}: outcomes must be a 1-D array, got shape {x.shape}", param=name)
    if not np.isfinite(x).all():
        raise ValidationError(f"{name}: outcomes must be finite (no NaN or inf)", param=name)
    return x


def _variance(x: np.ndarray) -> float | None:
    """Sample variance (ddof=1) of [n] outcomes; None when n < 2."""
    return float(np.var(x, ddof=1)) if x.size >= 2 else None


def _finite(v) -> float | None:
    """``v`` as a Python float, or None when it is NaN or infinite."""
    v = float(v)
    return v if math.isfinite(v) else None


# --- per arm ----------------------------------------------------------------------------------------
def arm_summary(values) -> dict:
    """``{"n_units": int, "mean": float | None, "variance": float | None}`` of one arm.

    ``values``: [n] outcomes, one per unit. ``mean`` is None for an empty arm, ``variance`` (the
    unbiased sample variance, ddof=1, in squared outcome units) for fewer than 2 units.
    """
    x = _values(values, "values")
    return {
        "n_units": int(x.size),
        "mean": float(x.mean()) if x.size else None,
        "variance": _variance(x),
    }


# --- fixed-horizon test -----------------------------------------------------------------------------
def _welch_result(c: np.ndarray, t: np.ndarray):
    """scipy's Welch ``TtestResult`` of treatment vs control, or None where it is undefined
    (fewer than 2 units in an arm, or zero variance in both arms: no standard error)."""
    if c.size < 2 or t.size < 2:
        return None
    if _variance(c) == 0.0 and _variance(t) == 0.0:
        return None
    return ttest_ind(t, c, equal_var=False)


def _welch_dict(res) -> dict:
    if res is None:
        return {"t": None, "df": None, "p": None}
    return {"t": _finite(res.statistic), "df": _finite(res.df), "p": _finite(res.pvalue)}


def welch(control, treatment) -> dict:
    """Welch's unequal-variances t-test of the difference in means: ``{"t", "df", "p"}``.

    ``control``, ``treatment``: [n_c], [n_t] outcomes. With m, s^2, n each arm's mean, sample
    variance and size (Welch 1947, Biometrika 34:28-35; Satterthwaite 1946 for the df):

        t  = (m_t - m_c) / sqrt(s_t^2/n_t + s_c^2/n_c)          t > 0: treatment higher
        df = (s_t^2/n_t + s_c^2/n_c)^2 / ((s_t^2/n_t)^2/(n_t-1) + (s_c^2/n_c)^2/(n_c-1))
        p  = two-sided, Student t with df degrees of freedom

    computed by ``scipy.stats.ttest_ind(treatment, control, equal_var=False)``. Not Student's
    pooled test: arms of different sizes and variances (a classifier that changes behaviour
    changes the spread too) make the pooled test's p wrong. All three are None when fewer than
    2 units are in an arm or both arms have zero variance.
    """
    c, t = _values(control, "control"), _values(treatment, "treatment")
    return _welch_dict(_welch_result(c, t))


def _check_level(level: float, name: str) -> None:
    if not 0.0 < level < 1.0:
        raise ValidationError(f"{name} must be in (0, 1), got {level}", param=name)


def _lift_dict(c: np.ndarray, t: np.ndarray, res, level: float) -> dict:
    if c.size == 0 or t.size == 0:
        return {"lift": None, "relative_lift": None, "ci95": None}
    mean_c = float(c.mean())
    diff = float(t.mean()) - mean_c
    ci = None
    if res is not None:
        lo, hi = res.confidence_interval(confidence_level=level)
        lo, hi = _finite(lo), _finite(hi)
        ci = [lo, hi] if lo is not None and hi is not None else None
    return {"lift": diff, "relative_lift": diff / mean_c if mean_c != 0.0 else None, "ci95": ci}


def lift(control, treatment, level: float = CI_LEVEL) -> dict:
    """``{"lift", "relative_lift", "ci95"}``: the difference in means and its Welch interval.

    ``lift`` = m_t - m_c in outcome units (None if an arm is empty); ``relative_lift`` =
    lift / m_c (None also when m_c = 0); ``ci95`` = [lo, hi], the two-sided ``level`` interval

        lift -/+ t_{df, (1+level)/2} * sqrt(s_t^2/n_t + s_c^2/n_c)     (Satterthwaite df)

    from ``TtestResult.confidence_interval`` of scipy's Welch test (the key keeps its name for
    any ``level``); None where ``welch`` is undefined. It is a fixed-horizon interval: it does
    not keep its coverage when the experiment is stopped on a peek.
    """
    _check_level(level, "level")
    c, t = _values(control, "control"), _values(treatment, "treatment")
    return _lift_dict(c, t, _welch_result(c, t), level)


# --- assignment health ------------------------------------------------------------------------------
def srm_p(n_control: int, n_treatment: int, split: float) -> float | None:
    """p-value of a sample ratio mismatch: are the counts a fair draw from the configured split?

    ``split``: the treatment's configured share of units, in (0, 1). Pearson's chi-square goodness
    of fit, one degree of freedom (``scipy.stats.chisquare``), of the observed counts against
    N * (1 - split) and N * split, N = n_control + n_treatment. A p below ``SRM_ALPHA`` means the
    assignment (or the logging of outcomes) is broken and any lift is untrustworthy (Fabijan et
    al., KDD 2019). None when there are no units. ``ValidationError`` for a negative or
    non-integer count or a split outside (0, 1).
    """
    for name, n in (("n_control", n_control), ("n_treatment", n_treatment)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValidationError(f"{name} must be an integer >= 0, got {n!r}", param=name)
    split = float(split)
    if not 0.0 < split < 1.0:
        raise ValidationError(f"split (the treatment share) must be in (0, 1), got {split}", param="split")
    total = int(n_control) + int(n_treatment)
    if total == 0:
        return None
    res = chisquare([int(n_control), int(n_treatment)], f_exp=[total * (1.0 - split), total * split])
    return _finite(res.pvalue)


# --- sequential test --------------------------------------------------------------------------------
def msprt_p(control, treatment, tau_sd: float = MSPRT_TAU_SD) -> float | None:
    """Always-valid p-value of the mixture SPRT for a difference in means, in [0, 1].

    ``control``, ``treatment``: [n_c], [n_t] outcomes so far. Johari, Koomen, Pekelis, Walsh,
    "Always Valid Inference: Continuous Monitoring of A/B Tests", Operations Research 70(3), 2022
    (arXiv 1512.04922), the mSPRT with a normal mixing distribution N(0, tau^2) over the
    difference theta = mu_t - mu_c, against H0: theta = 0. With d = m_t - m_c and
    V = s_c^2/n_c + s_t^2/n_t its variance:

        tau^2  = (tau_sd * pooled sd)^2,  pooled var = ((n_c-1) s_c^2 + (n_t-1) s_t^2) / (n_c+n_t-2)
        Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))
        p      = min(1, 1 / Lambda)

    Lambda is the Bayes factor N(d; 0, V + tau^2) / N(d; 0, V): the likelihood of d averaged over
    the prior, over its likelihood at theta = 0. With n units per arm and V = 2 sigma^2 / n it is
    the paper's normal-data statistic sqrt(2s^2 / (2s^2 + n tau^2)) exp(n^2 tau^2 d^2 /
    (4 s^2 (2 s^2 + n tau^2))); for 0/1 outcomes the paper plugs in V as here. Under H0 Lambda is
    a martingale with mean 1, so by Ville's inequality P(sup_n Lambda_n >= 1/alpha) <= alpha: the
    rule "stop the first time p < alpha" keeps its type I error at alpha however often it is
    read. The paper's p-value is the running minimum of this value over the looks; this function
    sees only the data, so it returns the current look's value, and a caller that has seen
    p < alpha once may keep that verdict. The guarantee is exact for known variances and
    asymptotic with them estimated (here, and tau scales with the estimate so the p is unchanged
    by the outcome's units); the tests check it by simulation from 50 units per arm.

    ``tau_sd`` (> 0) is the effect size, in outcome sds, that the test is most sensitive to;
    smaller detects small lifts later and large ones sooner. None when fewer than 2 units are in
    an arm or both arms have zero variance.
    """
    if not (math.isfinite(tau_sd) and tau_sd > 0.0):
        raise ValidationError(f"tau_sd must be > 0, got {tau_sd}", param="tau_sd")
    c, t = _values(control, "control"), _values(treatment, "treatment")
    return _msprt(c, t, tau_sd)


def _msprt(c: np.ndarray, t: np.ndarray, tau_sd: float) -> float | None:
    n_c, n_t = c.size, t.size
    if n_c < 2 or n_t < 2:
        return None
    var_c, var_t = float(np.var(c, ddof=1)), float(np.var(t, ddof=1))
    v = var_c / n_c + var_t / n_t
    if v == 0.0:
        return None
    tau2 = tau_sd**2 * ((n_c - 1) * var_c + (n_t - 1) * var_t) / (n_c + n_t - 2)
    d = float(t.mean()) - float(c.mean())
    log_lambda = 0.5 * math.log(v / (v + tau2)) + tau2 * d * d / (2.0 * v * (v + tau2))
    return math.exp(min(0.0, -log_lambda))  # min(1, 1/Lambda), without overflow for a huge Lambda


# --- the verdict ------------------------------------------------------------------------------------
def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def compare(control, treatment, *, split: float, min_samples: int, sequential: bool, alpha: float = ALPHA,
            p_floor: float | None = None) -> dict:
    """Every figure of the experiment and what to do about it, as one JSON-able dict.

    ``control``, ``treatment``: [n_c], [n_t] outcomes; ``split``: the treatment's configured share
    of units; ``min_samples``: units each arm needs before any verdict; ``sequential``: the
    experiment is watched as it runs, so the decision reads ``msprt_p`` rather than Welch's p;
    ``p_floor``: the smallest always-valid p of the earlier looks — the always-valid p-value is the
    running minimum over looks (Johari, Koomen, Pekelis & Walsh 2022, "Always valid inference",
    section 3), so a look never raises it.

        {"arms": {"control": arm_summary, "treatment": arm_summary},
         "lift", "relative_lift", "ci95",         # as ``lift`` (95% Welch interval)
         "welch": {"t", "df", "p"},               # as ``welch``
         "srm_p", "srm": srm_p < SRM_ALPHA,       # as ``srm_p``; srm False when srm_p is None
         "sequential_p": msprt_p or None,         # None unless ``sequential``
         "p": the p the decision reads,
         "recommendation": "keep running" | "promote" | "rollback" | "inconclusive",
         "reason": one sentence for a person}

    The rule is in the module docstring. ``ValidationError`` for malformed outcomes, a split
    outside (0, 1), a negative ``min_samples`` or an alpha outside (0, 1).
    """
    _check_level(alpha, "alpha")
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 0:
        raise ValidationError(f"min_samples must be an integer >= 0, got {min_samples!r}", param="min_samples")
    c, t = _values(control, "control"), _values(treatment, "treatment")
    res = _welch_result(c, t)
    welch_d = _welch_dict(res)
    lift_d = _lift_dict(c, t, res, CI_LEVEL)
    srm = srm_p(int(c.size), int(t.size), split)
    flagged = srm is not None and srm < SRM_ALPHA
    seq_p = _msprt(c, t, MSPRT_TAU_SD) if sequential else None
    if seq_p is not None and p_floor is not None:
        seq_p = min(seq_p, float(p_floor))
    p = seq_p if sequential else welch_d["p"]
    diff = lift_d["lift"]
    test = "always-valid mSPRT" if sequential else "Welch t-test"

    if c.size < min_samples or t.size < min_samples:
        rec = "keep running"
        reason = (f"Control has {c.size} and treatment {t.size} units; each arm needs {min_samples} "
                  "before a decision.")
    elif flagged:
        rec = "inconclusive"
        reason = (f"Sample ratio mismatch: {c.size} control vs {t.size} treatment units against a "
                  f"configured treatment share of {float(split):g} (chi-square p = {_fmt_p(srm)} < "
                  f"{SRM_ALPHA:g}); the split is broken, so the results are untrustworthy.")
    elif p is not None and p < alpha and diff is not None and diff != 0.0:
        rec = "promote" if diff > 0 else "rollback"
        rel = lift_d["relative_lift"]
        rel_s = f" ({rel:+.1%})" if rel is not None else ""
        reason = (f"Treatment is {'higher' if diff > 0 else 'lower'} by {abs(diff):.4g}{rel_s}, "
                  f"{test} p = {_fmt_p(p)} < {alpha:g}.")
    elif p is None:
        rec = "inconclusive"
        reason = (f"The {test} is undefined: an arm has fewer than 2 units or neither arm's "
                  "outcomes vary.")
    else:
        rec = "inconclusive"
        reason = f"No significant difference: {test} p = {_fmt_p(p)} >= {alpha:g}."

    return {
        "arms": {
            "control": arm_summary(c),
            "treatment": arm_summary(t),
        },
        "lift": lift_d["lift"],
        "relative_lift": lift_d["relative_lift"],
        "ci95": lift_d["ci95"],
        "welch": welch_d,
        "srm_p": srm,
        "srm": flagged,
        "sequential_p": seq_p,
        "p": p,
        "recommendation": rec,
        "reason": reason,
    }
