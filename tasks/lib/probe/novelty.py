"""Drift: how far an image's code lies from the training codes, and when that is "novel".
Pure functions on arrays.

The score is the deep-nearest-neighbour out-of-distribution score of Sun, Ming, Zhu and Li
2022 ("Out-of-Distribution Detection with Deep Nearest Neighbors", ICML): the Euclidean
distance to the k-th nearest training code, codes L2-normalized first (`unit`), found by
scikit-learn's NearestNeighbors (exact). The codes are the probe's: in its standardized space
(the space its linear layer reads), then normalized. The threshold is the val split's
(1 - rate) quantile of the same distance, so that `rate` of val images, which look like the
training data, would be flagged.

Measured on hymenoptera (tasks/lib/probe/trust.py's model, k = 5, threshold on its 42 val
images): the normalization is what keeps its own test images below 5% (2.0% flagged, 8.5%
without it); digits through that model are flagged 100% either way. k = 1 is fragile: one
stray training image near where all the digits land let 99% of them through.
"""

from __future__ import annotations

import numpy as np

K = 5  # the k-th neighbour's distance is the score
RATE = 0.01  # the share of val images the threshold flags
MAX_REFERENCE = 5000  # training codes kept with the head at most (a seeded uniform subsample)


def unit(x: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero); (N, D) float32 -> (N, D)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def reference_rows(n: int, cap: int, seed: int) -> np.ndarray:
    """Which of n training codes travel with the model: all when n <= cap, else a uniform
    random subset of cap (numpy's default_rng(seed), without replacement), in ascending
    order; (min(n, cap),) indices."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def kth_distance(reference: np.ndarray, queries: np.ndarray | None, k: int = K) -> np.ndarray:
    """Euclidean distance from each query (M, D) to its k-th nearest reference row (N, D);
    (M,). Rows as given (`unit` them first for the score of Sun et al.). `queries` None
    scores the reference rows themselves, each without itself (leave one out:
    NearestNeighbors.kneighbors with no X). k is capped at the rows there are."""
    from sklearn.neighbors import NearestNeighbors

    ref = np.asarray(reference, dtype=np.float32)
    k = max(1, min(k, len(ref) - (queries is None)))
    nn = NearestNeighbors(n_neighbors=k).fit(ref)
    x = None if queries is None else np.asarray(queries, dtype=np.float32)
    return nn.kneighbors(x, n_neighbors=k)[0][:, -1]


def threshold(distances: np.ndarray, rate: float = RATE) -> float:
    """The distance above which `rate` of these held-out distances lie (their 1 - rate
    quantile, numpy's default linear interpolation). Raises ValueError on none."""
    if len(distances) == 0:
        raise ValueError("a novelty threshold needs at least one held-out distance")
    return float(np.quantile(np.asarray(distances, dtype=np.float64), 1.0 - rate))


def is_novel(distances: np.ndarray, limit: float) -> np.ndarray:
    """True where an image is farther from the training codes than the threshold; (M,)."""
    return np.asarray(distances) > limit


def summary(novel: np.ndarray) -> str:
    """The run summary's line: "12 of 40 new images look unlike the training set"."""
    n, m = int(np.sum(novel)), len(novel)
    return f"{n} of {m} new image{'s' if m != 1 else ''} look{'s' if m == 1 else ''} " \
           "unlike the training set"
