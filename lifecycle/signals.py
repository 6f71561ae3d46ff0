"""The drift statistics of one classifier's window against its reference profile: pure functions.

Every function takes plain arrays or mappings, returns a float (or a named tuple), and returns
None where the statistic is undefined — an empty side, or fewer than ``MIN_ROWS`` rows for the
embedding statistics — so a quiet classifier has no signal rather than a NaN. Malformed input
(wrong shapes, negative counts, non-finite values) raises ``ValidationError``.

    signal                 input                             reads as
    psi                    label counts, reference/current   > PSI_MODERATE: moderate, > PSI_MAJOR: major shift
    label_js               label counts                      Jensen-Shannon distance, 0 same .. 1 disjoint
    confidence_ks          top-1 confidences                 KS statistic, 0 same .. 1 disjoint
    estimated_accuracy     top-1 confidences (current)       expected accuracy of a calibrated head
    domain_auc             embeddings [n, d] / [m, d]        ROC AUC of a reference-vs-current classifier
    mmd2                   embeddings                        unbiased MMD^2, RBF kernel, median bandwidth
    embedding_drift        embeddings                        both of the above from one Gram matrix
    canary_scores          labelled canary set               accuracy and macro F1

Speed: the budget is every signal of 1,000 classifiers in 10 s on 2 cores, a few ms per
classifier at reservoirs of 200 x 384 per side; ``domain_auc`` and ``mmd2`` are the only costly
ones. Both work from the Gram matrix of the pooled rows (one float32 GEMM; ``embedding_drift``
computes it once for both). The domain classifier is ridge regression solved in its dual form
on that matrix, one Cholesky factorisation per fold, scored by ranks: the same numbers as
sklearn's ``Ridge`` per ``StratifiedKFold`` fold and ``roc_auc_score`` (the tests check both),
which took several times longer, almost all of it per-call validation and copies.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, rankdata

from headfleet.errors import ValidationError

PSI_MODERATE = 0.1  # Siddiqi (2006): < 0.1 no significant shift, 0.1 - 0.25 moderate
PSI_MAJOR = 0.25  # > 0.25 major shift
PSI_EPS = 1e-4  # proportions are clipped below at this before the log (an empty category is not infinitely surprising)
DOMAIN_AUC_THRESHOLD = 0.55  # Evidently's default for its model-based embedding drift method
MIN_ROWS = 10  # fewer rows on either side: domain_auc and mmd2 return None
DOMAIN_FOLDS = 3
DOMAIN_RIDGE_ALPHA = 1.0  # sklearn Ridge/RidgeClassifier's default penalty
MAX_ROWS = 500  # domain_auc and mmd2 subsample a larger side (cost grows as rows^2 .. rows^3)


# --- label distributions ---------------------------------------------------------------------------
def _proportions(reference: Mapping[Hashable, float], current: Mapping[Hashable, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Both sides as proportions over the union of their keys, [k] each; None if a side sums to 0."""
    keys = list(dict.fromkeys([*reference, *current]))
    p = np.array([float(reference.get(k, 0.0)) for k in keys], dtype=np.float64)
    q = np.array([float(current.get(k, 0.0)) for k in keys], dtype=np.float64)
    if not (np.isfinite(p).all() and np.isfinite(q).all()) or (p < 0).any() or (q < 0).any():
        raise ValidationError("label counts must be finite and >= 0")
    if p.sum() == 0 or q.sum() == 0:
        return None
    return p / p.sum(), q / q.sum()


def psi(reference: Mapping[Hashable, float], current: Mapping[Hashable, float], eps: float = PSI_EPS) -> float | None:
    """Population Stability Index of the label distribution (natural log, >= 0, unbounded).

    ``reference``, ``current``: label -> count or proportion (each side is normalised by its own
    total, so counts and proportions mix). Categories are the union of the keys; a missing key
    counts 0. With r, c the proportions, each clipped below at ``eps``:

        PSI = sum_i (c_i - r_i) * ln(c_i / r_i)

    Rule of thumb (Siddiqi 2006, "Credit Risk Scorecards", Wiley, ch. 8): < ``PSI_MODERATE``
    (0.1) no significant shift, up to ``PSI_MAJOR`` (0.25) moderate, above that major; the
    statistic's sampling distribution (a scaled chi-square, so the bands depend on the sample
    sizes and the number of categories) is in Yurdakul 2018, "Statistical properties of
    population stability index", PhD thesis, Western Michigan University. The clipping is the
    common one (Evidently's ``psi`` replaces a 0 proportion by 1e-4).

    Returns None when either side is empty (sums to 0). Raises ``ValidationError`` for a
    negative or non-finite count.
    """
    props = _proportions(reference, current)
    if props is None:
        return None
    r, c = (np.maximum(x, eps) for x in props)
    return float(np.sum((c - r) * np.log(c / r)))


def label_js(reference: Mapping[Hashable, float], current: Mapping[Hashable, float]) -> float | None:
    """Jensen-Shannon distance between the label distributions, base 2, in [0, 1].

    ``sqrt(JSD(r, c))`` with ``JSD = (KL(r || m) + KL(c || m)) / 2``, ``m = (r + c) / 2``
    (Lin 1991, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory
    37(1); the square root is a metric, Endres & Schindelin 2003), computed by
    ``scipy.spatial.distance.jensenshannon``. Inputs as for :func:`psi`; unlike PSI it needs no
    clipping (0 for identical distributions, 1 for disjoint ones). None when a side is empty.
    """
    props = _proportions(reference, current)
    if props is None:
        return None
    return float(jensenshannon(props[0], props[1], base=2))


# --- confidences -----------------------------------------------------------------------------------
def _confidences(values: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 2:
        x = x.max(axis=1) if x.shape[0] else np.empty(0)
    if x.ndim != 1:
        raise ValidationError(f"{name} must be [n] top-1 confidences or [n, labels] probabilities, got {list(x.shape)}")
    if not np.isfinite(x).all() or (x < 0).any() or (x > 1).any():
        raise ValidationError(f"{name} must be probabilities in [0, 1]")
    return x


def confidence_ks(reference: np.ndarray, current: np.ndarray) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic of the top-1 confidences, in [0, 1].

    ``reference``: ``[n]`` confidences (or ``[n, labels]`` probabilities, whose row maxima are
    taken); ``current``: ``[m]`` likewise. ``D = sup_x |F_ref(x) - F_cur(x)|`` over the two
    empirical CDFs (Kolmogorov 1933, Smirnov 1948), from ``scipy.stats.ks_2samp``; only the
    statistic is returned (its p-value assumes independent rows, which a window of one user's
    traffic is not). None when either side is empty, never NaN. Raises ``ValidationError`` for
    a value outside [0, 1] or NaN.
    """
    r, c = _confidences(reference, "reference"), _confidences(current, "current")
    if r.size == 0 or c.size == 0:
        return None
    return float(ks_2samp(r, c).statistic)


def estimated_accuracy(confidences: np.ndarray) -> float | None:
    """Expected accuracy of a calibrated single-label head on unlabelled rows: mean top-1 probability.

    ``confidences``: ``[n]`` top-1 probabilities, or ``[n, labels]`` probabilities (row maxima
    taken). If the head is calibrated, P(prediction correct | confidence p) = p, so the expected
    accuracy is E[p] — the idea of NannyML's confidence-based performance estimation (CBPE).
    It is only as good as the calibration, and it does not apply to multi-label (sigmoid) heads,
    whose top probability says nothing about the whole label set. None for no rows.
    """
    x = _confidences(confidences, "confidences")
    return float(x.mean()) if x.size else None


# --- embeddings ------------------------------------------------------------------------------------
def _pooled_gram(reference: np.ndarray, current: np.ndarray, max_rows: int, seed: int) -> tuple[np.ndarray, int] | None:
    """Gram matrix ``Z @ Z.T`` of the pooled rows ``Z = [reference; current]``, float32
    ``[n + m, n + m]``, and n; each side first subsampled (uniformly, without replacement,
    seeded) to ``max_rows``. None when a side has fewer than ``MIN_ROWS`` rows."""
    a = np.asarray(reference, dtype=np.float32)
    b = np.asarray(current, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValidationError(f"embeddings must be [n, d] and [m, d], got {list(a.shape)} and {list(b.shape)}")
    if max_rows < MIN_ROWS:
        raise ValidationError(f"max_rows must be >= MIN_ROWS ({MIN_ROWS}), got {max_rows}")
    if len(a) < MIN_ROWS or len(b) < MIN_ROWS:
        return None
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValidationError("embeddings must be finite")
    rng = np.random.default_rng(seed)
    a, b = (x[np.sort(rng.choice(len(x), max_rows, replace=False))] if len(x) > max_rows else x for x in (a, b))
    z = np.concatenate([a, b])
    return z @ z.T, len(a)


def _stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number per row, [n] int: each class shuffled and dealt round-robin into k folds
    (what ``StratifiedKFold(k, shuffle=True)`` does, without its per-call cost)."""
    fold = np.empty(len(y), dtype=np.int64)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _ridge_oof(gram: np.ndarray, y: np.ndarray, fold: np.ndarray, alpha: float) -> np.ndarray:
    """Out-of-fold ridge decision values, float64 [n], from the Gram matrix ``gram`` [n, n].

    Per fold, on the training rows: targets t = 2y - 1, features and targets centred (an
    unpenalised intercept, as sklearn's Ridge), and the dual solution
        a = (Kc + alpha I)^-1 (t - mean(t)),   Kc = K - 1 c^T - c 1^T + mean(c),  c = column means of K,
    which equals the primal w = Xc^T a (Hastie, Tibshirani & Friedman, ESL 2nd ed., eq. 18.15).
    A held-out row x scores (x - mean_x) . w + mean(t)
        = k_x . a - mean(k_x) sum(a) - c . a + mean(c) sum(a) + mean(t),   k_x = its Gram row.
    float32 like the Gram matrix (Kc + alpha I has eigenvalues >= alpha = 1; only the ranking
    of the scores is used).
    """
    t = 2.0 * y - 1.0
    out = np.empty(len(y))
    for f in np.unique(fold):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        kc = gram.take(tr, axis=0).take(tr, axis=1)  # [n_tr, n_tr], a fresh copy, centred in place
        col = kc.mean(axis=0, dtype=np.float64)
        mu = col.mean()
        kc -= col.astype(np.float32)[None, :]
        kc -= col.astype(np.float32)[:, None]
        kc += np.float32(mu)
        kc.flat[:: len(tr) + 1] += np.float32(alpha)
        t_mean = t[tr].mean()
        factor = scipy.linalg.cho_factor(kc, overwrite_a=True, check_finite=False)
        a = scipy.linalg.cho_solve(factor, (t[tr] - t_mean).astype(np.float32), check_finite=False).astype(np.float64)
        k_te = gram.take(te, axis=0).take(tr, axis=1)  # [n_te, n_tr]
        s = a.sum()
        out[te] = k_te @ a - k_te.mean(axis=1, dtype=np.float64) * s - col @ a + mu * s + t_mean
    return out


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from ranks: (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n0 n1), ties at
    mid-rank (the Mann-Whitney identity, Hanley & McNeil 1982); = ``roc_auc_score(y, score)``."""
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def _domain_auc_from_gram(gram: np.ndarray, n: int, seed: int, folds: int, alpha: float) -> float:
    y = np.zeros(len(gram))
    y[n:] = 1.0
    fold = _stratified_folds(y, folds, np.random.default_rng([seed, 1]))
    return _auc(y, _ridge_oof(gram, y, fold, alpha))


def _mmd2_from_gram(gram: np.ndarray, n: int) -> float:
    """MMD2_u from the pooled Gram matrix, which it overwrites with the kernel matrix."""
    sq_norm = np.diag(gram).copy()
    d2 = gram  # [n+m, n+m] squared distances |z_i|^2 + |z_j|^2 - 2 z_i.z_j, float32, in place
    d2 *= -2.0
    d2 += sq_norm[:, None]
    d2 += sq_norm[None, :]
    np.maximum(d2, 0.0, out=d2)  # the diagonal is exactly 0: -2x + x + x
    upper = np.arange(len(d2))[:, None] < np.arange(len(d2))[None, :]
    dist = np.sqrt(d2[upper])  # the (n+m choose 2) pairwise distances
    s = float(np.median(dist))
    if s == 0.0:
        positive = dist[dist > 0]
        if positive.size == 0:
            return 0.0
        s = float(np.median(positive))
    d2 *= np.float32(-0.5 / (s * s))
    k = np.exp(d2, out=d2)
    m = len(k) - n
    sxx, syy, sxy = (float(b.sum(dtype=np.float64)) for b in (k[:n, :n], k[n:, n:], k[:n, n:]))
    # the diagonals are k(x, x) = exp(0) = 1 exactly
    return (sxx - n) / (n * (n - 1)) + (syy - m) / (m * (m - 1)) - 2.0 * sxy / (n * m)


def domain_auc(
    reference: np.ndarray,
    current: np.ndarray,
    seed: int = 0,
    *,
    folds: int = DOMAIN_FOLDS,
    alpha: float = DOMAIN_RIDGE_ALPHA,
    max_rows: int = MAX_ROWS,
) -> float | None:
    """ROC AUC of a classifier told to tell current rows from reference rows (a domain classifier).

    ``reference``: ``[n, d]`` embeddings, ``current``: ``[m, d]``. Rows are labelled 0
    (reference) and 1 (current); a ridge classifier (penalty ``alpha``, intercept unpenalised)
    is fitted on ``folds - 1`` folds of a stratified split and scores the held-out fold, and the
    AUC of the pooled out-of-fold scores is returned. About 0.5 when the two samples come from
    one distribution; above ``DOMAIN_AUC_THRESHOLD`` (0.55, the default of Evidently's
    model-based embedding drift method) reads as drift; near 1 the windows are separable. Only
    linear differences are seen (a mean shift in some direction), which is what a shift of topic
    or source does to sentence embeddings. The method is the discriminative drift detector of
    Gözüaçık et al. 2019 ("Unsupervised concept drift detection with a discriminative
    classifier", CIKM) and the classifier two-sample test of Lopez-Paz & Oquab 2017 (ICLR).

    With no drift, at 200 rows per side, one window's AUC has a standard deviation of about 0.04
    (measured on synthetic embeddings): about one window in twenty crosses 0.55 by chance, so
    act on it over consecutive windows.

    Sides with more than ``max_rows`` rows are subsampled uniformly (seeded). Deterministic for
    a ``seed`` (the subsample and the folds). Returns None when either side has fewer than
    ``MIN_ROWS`` rows. Raises ``ValidationError`` for mismatched shapes, non-finite values,
    ``folds`` < 2, ``alpha`` <= 0 or ``max_rows`` < ``MIN_ROWS``.
    """
    if folds < 2 or not alpha > 0:
        raise ValidationError(f"domain_auc needs folds >= 2 and alpha > 0, got {folds} and {alpha}")
    pooled = _pooled_gram(reference, current, max_rows, seed)
    return None if pooled is None else _domain_auc_from_gram(*pooled, seed, folds, alpha)


def mmd2(reference: np.ndarray, current: np.ndarray, max_rows: int = MAX_ROWS, seed: int = 0) -> float | None:
    """Unbiased squared maximum mean discrepancy with a Gaussian (RBF) kernel.

    ``reference``: ``[n, d]``, ``current``: ``[m, d]``. Gretton et al. 2012, "A Kernel
    Two-Sample Test", JMLR 13, eq. (3):

        MMD2_u = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
                 - 2/(nm) sum_{i,j} k(x_i, y_j),        k(x, y) = exp(-|x - y|^2 / (2 s^2))

    with the bandwidth s the median distance between distinct rows of the pooled sample (the
    median heuristic, ibid. sec. 8). If more than half the pairs coincide, s is the median of
    the non-zero distances; if all rows are one point, the result is 0. Unitless, about 0 (it
    can be slightly negative) when both come from one distribution; grows with the shift, at
    most 2. Sides above ``max_rows`` are subsampled uniformly (seeded by ``seed``). None when
    either side has fewer than ``MIN_ROWS`` rows. Raises ``ValidationError`` as ``domain_auc``.
    """
    pooled = _pooled_gram(reference, current, max_rows, seed)
    return None if pooled is None else _mmd2_from_gram(*pooled)


class EmbeddingDrift(NamedTuple):
    """Both embedding statistics of one window; None where a side has fewer than ``MIN_ROWS`` rows."""

    domain_auc: float | None
    mmd2: float | None


def embedding_drift(
    reference: np.ndarray, current: np.ndarray, seed: int = 0, *, max_rows: int = MAX_ROWS
) -> EmbeddingDrift:
    """``domain_auc`` and ``mmd2`` (default settings) from one Gram matrix: the same values as the
    two calls, for about a fifth less time (the pooled GEMM is done once)."""
    pooled = _pooled_gram(reference, current, max_rows, seed)
    if pooled is None:
        return EmbeddingDrift(None, None)
    gram, n = pooled
    auc = _domain_auc_from_gram(gram, n, seed, DOMAIN_FOLDS, DOMAIN_RIDGE_ALPHA)  # reads gram
    return EmbeddingDrift(auc, _mmd2_from_gram(gram, n))  # overwrites gram


# --- canary ----------------------------------------------------------------------------------------
class CanaryScores(NamedTuple):
    """Scores of a head on its labelled canary set."""

    accuracy: float  # share of rows predicted exactly (multi-label: the whole label set, subset accuracy)
    macro_f1: float  # mean F1 over the labels the canary set holds


def canary_scores(
    y_true: Sequence, y_pred: Sequence, labels: Sequence[str], *, multi_label: bool | None = None
) -> CanaryScores | None:
    """Accuracy and macro F1 of predictions against a labelled canary set.

    The same values as ``sklearn.metrics.accuracy_score`` and ``f1_score(average="macro",
    labels=present, zero_division=0)`` (a test checks), computed from per-label counts
    (F1 = 2 TP / (2 TP + FP + FN)) in well under a millisecond: sklearn's argument checks alone
    cost ~15 ms a call, which a monitor closing a window for a thousand classifiers cannot pay.

    Single-label: ``y_true``, ``y_pred`` are ``[n]`` label strings. Multi-label: ``[n]``
    collections of label strings (lists, tuples, sets), binarised over ``labels`` with
    ``MultiLabelBinarizer``; accuracy is then exact-match (subset) accuracy, the harsh one: a row
    counts only if its whole predicted set is right. ``multi_label=None`` tells the two apart by
    the rows (all collections, or all strings). Macro F1 averages F1 over the labels that occur
    in ``y_true`` (a label the canary set lacks has no recall to average; a wrong prediction of
    it still costs the true label's recall) — the rule of
    ``headfleet.heads.metrics.classification_metrics``, so canary and holdout scores compare.
    If no row holds any label (multi-label, all sets empty), macro F1 is 0.0.

    Returns None for no rows. Raises ``ValidationError`` for lengths that differ, a label not
    in ``labels``, or rows that are not what ``multi_label`` says (or a mix of both kinds).
    """
    if len(y_true) != len(y_pred):
        raise ValidationError(f"y_true has {len(y_true)} rows, y_pred {len(y_pred)}")
    if len(y_true) == 0:
        return None
    rows = [*y_true, *y_pred]
    is_set = [isinstance(r, (list, tuple, set, frozenset)) for r in rows]
    if multi_label is None:
        multi_label = is_set[0]
    if not all(x == multi_label for x in is_set):
        kind = "collections of labels" if multi_label else "single labels"
        raise ValidationError(f"canary rows must all be {kind}")
    known = set(labels)
    unknown = ({v for r in rows for v in r} if multi_label else set(rows)) - known
    if unknown:
        raise ValidationError(f"labels not in the head's schema: {sorted(map(str, unknown))}")
    index = {lab: j for j, lab in enumerate(labels)}
    t = np.zeros((len(y_true), len(index)), dtype=bool)  # [n, L] indicators
    p = np.zeros_like(t)
    for m, ys in ((t, y_true), (p, y_pred)):
        for i, row in enumerate(ys):
            m[i, [index[v] for v in row] if multi_label else index[row]] = True
    accuracy = float((t == p).all(axis=1).mean())
    present = t.any(axis=0)
    if not present.any():
        return CanaryScores(accuracy=accuracy, macro_f1=0.0)
    tp = (t & p).sum(axis=0)[present]
    wrong = (t ^ p).sum(axis=0)[present]  # FP + FN
    denom = 2 * tp + wrong
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)
    return CanaryScores(accuracy=accuracy, macro_f1=float(f1.mean()))
