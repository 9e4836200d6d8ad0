"""Calibrated confidence and the reject option: temperature scaling, expected calibration
error, accuracy against coverage. Pure functions on arrays.

Temperature scaling (Guo, Pleiss, Sun and Weinberger 2017, "On Calibration of Modern Neural
Networks", ICML): one scalar T > 0 divides the logits, fitted by minimizing the negative
log-likelihood on held-out data; the argmax (the predicted class) never changes, only how
sure the model says it is. Expected calibration error as in the same paper (after Naeini et
al. 2015): the confidence-weighted gap between accuracy and mean top probability over 15
equal-width bins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BINS = 15  # ECE bins, as Guo et al. report it
COVERAGE_AT = (0.5, 0.8, 0.9, 0.95)  # the min-confidence values evaluate reports
_LOG_T = (np.log(1e-2), np.log(1e2))  # the temperatures searched: 0.01 .. 100
_TINY = np.finfo(np.float64).tiny


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis; (N, K) -> (N, K)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Logits that give these probabilities under softmax (log p, up to a per-row constant,
    which softmax ignores): how a model known only by its probabilities is calibrated."""
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), _TINY))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes `y` (N,) class indices under
    softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    zmax = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.01, 100] minimizing the NLL of softmax(logits / T) on held-out data
    (logits (N, K), y (N,) class indices); Guo et al. 2017. A bounded 1-D search on log T
    (scipy's minimize_scalar, Brent): deterministic. Raises ValueError on no data."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        raise ValueError("temperature scaling needs at least one held-out example")
    res = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))),
                          bounds=_LOG_T, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray,
                               n_bins: int = N_BINS) -> float:
    """ECE of probabilities (N, K) against true class indices y (N,): sum over equal-width
    bins of the top probability of |accuracy - mean confidence| x the bin's share of N.
    0 is perfectly calibrated; in [0, 1]."""
    conf = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    # bin b holds (b/n, (b+1)/n]; a confidence of exactly 0 goes to the first
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        inside = bins == b
        ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def coverage_table(confidence: np.ndarray, correct: np.ndarray,
                   at: Sequence[float] = COVERAGE_AT) -> list[dict]:
    """For each min confidence P: the share of images kept (confidence >= P), how many, and
    the accuracy on those kept (None when none is). confidence, correct: (N,)."""
    rows = []
    for p in at:
        kept = confidence >= p
        n = int(kept.sum())
        rows.append({"min_confidence": float(p), "coverage": float(kept.mean()), "kept": n,
                     "accuracy": float(correct[kept].mean()) if n else None})
    return rows
