"""Synthetic sentence-embedding-like data: well-separated Gaussian clusters on the unit sphere.

Real embeddings would need the model; the heads only ever see float32 [n, 384] unit vectors,
so clusters around random unit centres exercise exactly the same code paths, in milliseconds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

DIM = 384


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Matrices here are tiny; BLAS worker threads only spin against whatever else shares the
    CPU (on a busy 2-core box they made these tests 5x slower). Module scope: restored after."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def seed() -> int:
    return 1234


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def make_clusters(seed) -> Callable[..., tuple[np.ndarray, list[str]]]:
    """make_clusters({"a": 30, "b": 30}) -> (X [60, 384] float32 unit rows, labels)."""

    def make(counts: dict[str, int], noise: float = 0.03, salt: int = 0) -> tuple[np.ndarray, list[str]]:
        rng = np.random.default_rng(seed + salt)
        centres = _unit(rng.normal(size=(len(counts), DIM)))
        xs, ys = [], []
        for centre, (label, n) in zip(centres, counts.items()):
            xs.append(centre + noise * rng.normal(size=(n, DIM)))
            ys += [label] * n
        order = rng.permutation(len(ys))
        return _unit(np.concatenate(xs))[order], [ys[i] for i in order]

    return make


@pytest.fixture(scope="session")
def make_multilabel(seed) -> Callable[..., tuple[np.ndarray, list[list[str]]]]:
    """make_multilabel(["x", "y", "z"], n) -> (X, label sets); each row embeds the sum of its
    labels' centres, so every label is linearly detectable."""

    def make(labels: list[str], n: int, noise: float = 0.03, salt: int = 0) -> tuple[np.ndarray, list[list[str]]]:
        rng = np.random.default_rng(seed + 100 + salt)
        centres = _unit(rng.normal(size=(len(labels), DIM)))
        on = rng.random((n, len(labels))) < 0.5
        on[~on.any(axis=1), 0] = True  # no empty rows, so every row has a direction
        X = on.astype(np.float64) @ centres + noise * rng.normal(size=(n, DIM))
        return _unit(X), [[labels[j] for j in np.flatnonzero(row)] for row in on]

    return make
