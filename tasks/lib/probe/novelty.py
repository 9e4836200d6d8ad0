"""Drift: how far an image's code lies from the training codes, and when that is "novel".
Pure functions on arrays.

The score is the deep-nearest-neighbour out-of-distribution score of Sun, Ming, Zhu and Li
2022 ("Out-of-Distribution Detection with Deep Nearest Neighbors", ICML): the Euclidean
distance to the k-th nearest training code, codes L2-normalized first (`unit`), found exactly
by brute force in numpy (`kth_distance`: scikit-learn's NearestNeighbors distances, checked
against it in tests/lib/test_novelty.py, without its 0.7 s import on predict's path). The
codes are the probe's: in its standardized space (the space its linear layer reads), then
normalized. The threshold is the val split's
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
CHUNK = 4_000_000  # float64 squared distances held at once by kth_distance (32 MB)


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
    (M,) float64. Rows as given (`unit` them first for the score of Sun et al.). `queries`
    None scores the reference rows themselves, each without itself (leave one out, as
    scikit-learn's NearestNeighbors.kneighbors with no X). k is capped at the rows there are.

    Exact, by brute force in numpy (the distances scikit-learn's NearestNeighbors finds,
    without importing it on predict's path): squared distances |q|^2 + |r|^2 - 2 q.r in
    float64, the k-th smallest by np.partition, in blocks of queries of at most CHUNK
    distances (32 MB), so 5,000 rows left one out need no 5,000 x 5,000 matrix. Train fits
    the threshold and predict scores images with this same function. Raises ValueError when
    there is no reference row to measure against (none, or one left out)."""
    ref = np.asarray(reference, dtype=np.float64)
    n = len(ref) - (queries is None)
    if n < 1:
        raise ValueError(f"a k-th neighbour distance needs reference rows, got {len(ref)}"
                         + (" (each left out of its own)" if queries is None else ""))
    k = max(1, min(k, n))
    x = ref if queries is None else np.asarray(queries, dtype=np.float64)
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    out = np.empty(len(x))
    step = max(1, CHUNK // len(ref))
    for start in range(0, len(x), step):
        q = x[start:start + step]
        d2 = q @ ref.T  # |r|^2 - 2 q.r in place; |q|^2, the same along a row, added last
        d2 *= -2.0
        d2 += ref_sq
        if queries is None:  # leave each row out of its own neighbours
            rows = np.arange(len(q))
            d2[rows, start + rows] = np.inf
        d2.partition(k - 1, axis=1)
        out[start:start + step] = d2[:, k - 1] + np.einsum("ij,ij->i", q, q)
    return np.sqrt(np.maximum(out, 0.0))


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
