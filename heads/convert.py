"""Fitted sklearn estimators -> HeadArrays, preserving ``predict_proba`` exactly.

What each estimator becomes (z: the estimator's decision values):
    LogisticRegression, 2 classes   -> logreg, softmax over [0, z]  (== [1 - sigmoid(z), sigmoid(z)])
    LogisticRegression, K classes   -> logreg, softmax over z       (sklearn >= 1.5 is multinomial)
    OneVsRestClassifier(LogReg),
        multilabel indicator y      -> logreg, sigmoid per label; a label constant in training
                                       (sklearn's _ConstantPredictor) becomes W = 0, b = +-50
    MLPClassifier (one relu layer)  -> mlp; binary logistic output -> softmax over [0, z];
                                       multi-class softmax; multi-label logistic per label
Anything else (other activations, several hidden layers, OvR over a single-label problem,
whose probabilities sklearn renormalises) is refused with ValidationError rather than
approximated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headfleet.errors import ValidationError
from headfleet.heads.types import HeadArrays

# sigmoid(+-50) is 1 / ~2e-22: indistinguishable from sklearn's constant 1 / 0 at any tolerance.
_CONSTANT_LOGIT = 50.0


def head_from_sklearn(
    model: Any, labels: list[str] | None = None, multi_label: bool | None = None
) -> HeadArrays:
    """Dispatch on the estimator type; sklearn is imported here, never at package import."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neural_network import MLPClassifier

    if isinstance(model, LogisticRegression):
        head = _from_logreg(model, labels)
    elif isinstance(model, OneVsRestClassifier):
        head = _from_ovr(model, labels)
    elif isinstance(model, MLPClassifier):
        head = _from_mlp(model, labels)
    else:
        raise ValidationError(f"cannot convert {type(model).__name__} to a head")
    if multi_label is not None and bool(multi_label) != head.multi_label:
        raise ValidationError(
            f"multi_label={multi_label} was asked for but the fitted {type(model).__name__} is "
            f"{'multi' if head.multi_label else 'single'}-label"
        )
    return head


def _labels(given: list[str] | None, classes: Any, n: int) -> list[str]:
    names = [str(c) for c in classes] if given is None else [str(c) for c in given]
    if len(names) != n:
        raise ValidationError(f"{len(names)} labels given for a model with {n} outputs")
    return names


def _binary_as_softmax(w: np.ndarray, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows [0, w] and biases [0, b]: softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)]."""
    W = np.zeros((2, w.shape[0]), dtype=np.float64)
    W[1] = w
    return W, np.array([0.0, b])


def _from_logreg(model: Any, labels: list[str] | None) -> HeadArrays:
    _require_fitted(model, "coef_")
    classes = model.classes_
    coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)
    if len(classes) == 2:
        W, b = _binary_as_softmax(coef[0], float(intercept[0]))
    else:
        if getattr(model, "multi_class", "multinomial") == "ovr":
            raise ValidationError("one-vs-rest LogisticRegression renormalises sigmoids; refit multinomial")
        W, b = coef, intercept
    return HeadArrays("logreg", _labels(labels, classes, len(classes)), False, W, b)


def _from_ovr(model: Any, labels: list[str] | None) -> HeadArrays:
    from sklearn.linear_model import LogisticRegression

    _require_fitted(model, "estimators_")
    y_type = getattr(model.label_binarizer_, "y_type_", None)
    if y_type != "multilabel-indicator":
        raise ValidationError(
            "OneVsRestClassifier is only converted for multi-label data (its single-label "
            "probabilities are renormalised sigmoids); use a multinomial LogisticRegression"
        )
    rows, biases = [], []
    dim = model.n_features_in_
    for est in model.estimators_:
        if isinstance(est, LogisticRegression):
            rows.append(np.asarray(est.coef_)[0])
            biases.append(float(np.asarray(est.intercept_)[0]))
        elif hasattr(est, "y_"):  # sklearn's _ConstantPredictor: the label never varied in training
            rows.append(np.zeros(dim))
            biases.append(_CONSTANT_LOGIT if float(np.ravel(est.y_)[0]) >= 0.5 else -_CONSTANT_LOGIT)
        else:
            raise ValidationError(f"OneVsRestClassifier over {type(est).__name__} is not supported")
    n = len(rows)
    return HeadArrays("logreg", _labels(labels, model.classes_, n), True, np.stack(rows), np.array(biases))


def _from_mlp(model: Any, labels: list[str] | None) -> HeadArrays:
    _require_fitted(model, "coefs_")
    if model.activation != "relu":
        raise ValidationError(f"only relu MLP heads are supported, got activation={model.activation!r}")
    if len(model.coefs_) != 2:
        raise ValidationError(f"only one hidden layer is supported, got {len(model.coefs_) - 1}")
    W1, b1 = model.coefs_[0].T, model.intercepts_[0]
    W2, b2 = model.coefs_[1].T, model.intercepts_[1]  # [out, h], [out]
    out = model.out_activation_
    multi_label = out == "logistic" and model._label_binarizer.y_type_ == "multilabel-indicator"
    classes = model.classes_
    if out == "logistic" and not multi_label:  # binary: one logistic unit
        W2, b2 = _binary_as_softmax(W2[0], float(b2[0]))
    elif out not in ("logistic", "softmax"):
        raise ValidationError(f"unsupported MLP output activation {out!r}")
    n = W2.shape[0]
    return HeadArrays("mlp", _labels(labels, classes, n), multi_label, W1, b1, W2, b2)


def _require_fitted(model: Any, attr: str) -> None:
    if not hasattr(model, attr):
        raise ValidationError(f"{type(model).__name__} is not fitted")
