"""Trust in a model's answers: calibrated confidence (and the reject option it allows) and
the novelty check, fitted when the model is trained, recorded with it, applied by predict and
scored by evaluate. The arithmetic is in calibration.py and novelty.py; this module reads the
codes and keeps what is fitted in the head's sidecar and tensors.

The probe's temperature is fitted on out-of-fold logits over train + val, the refit's own
data, at the chosen layer and C: each of k stratified folds is scored by a probe fitted on
the others, as scikit-learn's CalibratedClassifierCV(cv=k, ensemble=False) gets the
predictions its calibrator is fitted on (cross_val_predict), with temperature scaling (Guo
et al. 2017) as the calibrator. Why not the refit probe's val logits: it has seen val, so
they are not held out. Why not only the train-fitted probe's val logits: the same size of
fit (k = 5 trains on 80% of train + val; train is 82% of it by default) but every image
held out once instead of val's 15%: a small val split (hymenoptera's: 37 images) gives the
one parameter a noisy fit. `sgd` streams codes larger than memory and is not calibrated
(predict then reports its own probabilities, and says so).

The fine-tuned network's temperature is fitted on its val logits (it was trained on train
only), by the fine-tune stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tlflow.tasks.lib.core.handoff.evaluate import Coverage, CoverageRow
from tlflow.tasks.lib.probe import calibration, novelty
from tlflow.tasks.lib.probe.head import Calibration, HeadMeta, LinearHead, ModelMeta, Novelty

FOLDS = 5  # out-of-fold logits for the probe's temperature
_FOLD = HeadMeta(layer="", extractor_id="")  # a fold's probe: only its logits are read


# ---------------------------------------------------------------- fitted by train


def logits_for(scores: np.ndarray, kind: str) -> np.ndarray:
    """What temperature scaling divides, from a model's scores (N, K): the log of its
    probabilities (a softmax head's logits up to a per-row constant, which softmax ignores),
    or an SVM's decision values as they are."""
    return calibration.logits_of(scores) if kind == "probability" else scores


def head_logits(head: LinearHead, codes: np.ndarray) -> np.ndarray:
    """The scores temperature scaling divides (N, K): a softmax head's logits, an SVM's
    decision values, the log of a one-vs-rest head's normalized probabilities."""
    if head.meta.scores == "ovr_probability":
        return calibration.logits_of(head.predict_proba(codes))
    return head.logits(codes)


def fit_probe_temperature(x: np.ndarray, y: np.ndarray, C: float, cfg: Any,
                          seed: int) -> Calibration | None:
    """The calibration record of a probe at C (train.* as `cfg`, logistic or linear_svm) refit
    on codes x (N, D) with labels y (N,): out-of-fold logits over k = min(5, smallest class)
    stratified folds (seeded), the temperature fitted on them, and their NLL before and
    after. None when a class has fewer than 2 images (no fold split).

    Each fold starts cold: warm-starting L-BFGS from the refit's weights (which have seen the
    held-out fold) stopped near them and leaked it (measured on the digits: out-of-fold NLL
    0.018 instead of 0.099, temperature 0.64 instead of 1.27)."""
    from sklearn.model_selection import StratifiedKFold

    from tlflow.tasks.lib.probe.sweep import make_probe, to_head

    classes, y_idx = np.unique(y, return_inverse=True)
    k = min(FOLDS, int(np.bincount(y_idx).min()))
    if k < 2 or len(classes) < 2:
        return None
    z = np.zeros((len(y), max(len(classes), 2)))
    for fit, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        z[held] = head_logits(to_head(make_probe(C, cfg, seed).fit(x[fit], y[fit]), _FOLD),
                              x[held])
    t = calibration.fit_temperature(z, y_idx)
    return Calibration(method="temperature", temperature=t, folds=k,
                       fit_on="out-of-fold logits, train + val", nll=calibration.nll(z, y_idx),
                       nll_calibrated=calibration.nll(z, y_idx, t))


def novelty_space(head: LinearHead, codes: np.ndarray) -> np.ndarray:
    """Raw codes (N, D) in the space the novelty check measures: the probe's standardized
    features, L2-normalized (novelty.py)."""
    return novelty.unit(head.features(np.asarray(codes, dtype=np.float32)))


def fit_novelty(head: LinearHead, x_train: np.ndarray, x_held: np.ndarray | None, seed: int,
                train_rows: int | None = None) -> tuple[np.ndarray, Novelty]:
    """The reference codes (R, D) float16 (novelty.reference_rows of x_train, raw codes as
    the store holds them) and the record: k, the threshold set on x_held (the val codes; None:
    train's own codes, each left out of its search), the rate, the rows kept, the train
    images they were drawn from (`train_rows`; default len(x_train))."""
    rows = novelty.reference_rows(len(x_train), novelty.MAX_REFERENCE, seed)
    reference = x_train[rows].astype(np.float16)
    space = novelty_space(head, reference)  # what predict will compare to
    held = None if x_held is None or not len(x_held) else novelty_space(head, x_held)
    limit = novelty.threshold(novelty.kth_distance(space, held, novelty.K), novelty.RATE)
    return reference, Novelty(k=novelty.K, threshold=limit, rate=novelty.RATE,
                              threshold_on="train, leave one out" if held is None else "val",
                              reference_rows=len(rows),
                              train_rows=len(x_train) if train_rows is None else train_rows)


def attach(head: LinearHead, store_path: Path, rows: list, cfg: Any, seed: int) -> LinearHead:
    """The head with its calibration and novelty record in the sidecar and the reference
    codes as a tensor, from the codes of its layer in the store (train and val rows of the
    manifest `rows`; `cfg` is params.train). Deterministic: the same inputs, the same bytes."""
    from tlflow.tasks.lib.features.store import FeatureStore

    train = [r for r in rows if r.split == "train"]
    val = [r for r in rows if r.split == "val"]
    keep = novelty.reference_rows(len(train), novelty.MAX_REFERENCE, seed)
    held = novelty.reference_rows(len(val), 4 * novelty.MAX_REFERENCE, seed)
    layer, in_memory = head.meta.layer, cfg.classifier != "sgd"
    with FeatureStore(store_path) as store:
        x_train = store.read(layer, [r.sha256 for r in (train if in_memory else
                                                        [train[i] for i in keep])])
        x_val = store.read(layer, [r.sha256 for r in val])
    cal = None
    if in_memory:
        y = np.array([r.label for r in train + val])
        cal = fit_probe_temperature(np.vstack([x_train, x_val]), y, head.meta.C, cfg, seed)
        x_train = x_train[keep]
    reference, nov = fit_novelty(head, x_train, x_val[held] if len(val) else None, seed,
                                 len(train))
    return replace(head, meta=head.meta.with_(
        calibration=cal and cal.model_dump(exclude_unset=True),
        novelty=nov.model_dump(exclude_unset=True)), reference=reference)


def describe(meta: HeadMeta) -> str:
    """One line on what train fitted: the temperature and the novelty threshold."""
    cal, nov = meta.calibration, meta.novelty
    a = (f"temperature {cal.temperature:.3f} (out-of-fold NLL {cal.nll:.4f} -> "
         f"{cal.nll_calibrated:.4f}, {cal.folds} folds)" if cal else "not calibrated")
    b = (f"novel beyond a distance of {nov.threshold:.3f} to the {nov.k}th neighbour "
         f"({nov.rate:.0%} of {nov.threshold_on}; {nov.reference_rows} of "
         f"{nov.train_rows} train codes kept)" if nov else "no novelty check")
    return f"{a}; {b}"


# ---------------------------------------------------------------- applied by predict


@dataclass(frozen=True)
class Assessment:
    """Per image: the (calibrated) top probability, whether it is below the min confidence,
    and whether the image is novel with its distance (None where the model has no check)."""

    confidence: np.ndarray | None  # (N,); None: decision values and no calibration
    calibrated: bool
    unsure: np.ndarray  # (N,) bool
    novel: np.ndarray | None  # (N,) bool
    distance: np.ndarray | None  # (N,) k-th neighbour distance


def fit_network_temperature(z: np.ndarray, y_idx: np.ndarray) -> Calibration:
    """The calibration record of the fine-tuned network from its val logits z (N, K) and
    true class indices (N,): val took no part in its training (it only chose the epoch), so
    its logits are held out, as in Guo et al. (2017). Rounded (T to 4 decimals, the NLLs to
    6): the same run gives the same sidecar bytes, whatever the last bits of its logits."""
    t = round(calibration.fit_temperature(z, y_idx), 4)
    return Calibration(method="temperature", temperature=t, fit_on="val logits",
                       nll=round(calibration.nll(z, y_idx), 6),
                       nll_calibrated=round(calibration.nll(z, y_idx, t), 6))


def temperature(meta: ModelMeta) -> float | None:
    """The temperature a model's sidecar records; None when it was not calibrated."""
    return meta.calibration.temperature if meta.calibration else None


def confidence(logits: np.ndarray, meta: ModelMeta, probabilities: bool) -> tuple[np.ndarray | None,
                                                                             bool]:
    """(top probability per image, calibrated?): softmax(logits / T) when the sidecar has a
    temperature, else the model's own probabilities, or None for uncalibrated decision
    values."""
    t = temperature(meta)
    if t is not None:
        return calibration.softmax(logits, t).max(axis=1), True
    return (calibration.softmax(logits).max(axis=1), False) if probabilities else (None, False)


def assess(logits: np.ndarray, meta: ModelMeta, probabilities: bool,
           min_confidence: float | None, head: LinearHead | None = None,
           codes: np.ndarray | None = None) -> Assessment:
    """The calibrated confidence of each image (logits (N, K)), which are below
    min_confidence (none when it is None), and, for a head with reference codes, which codes
    (N, D) are novel."""
    conf, calibrated = confidence(logits, meta, probabilities)
    unsure = np.zeros(len(logits), bool)
    if min_confidence is not None and conf is not None:
        unsure = conf < min_confidence
    novel = distance = None
    if head is not None and codes is not None and has_novelty(head):
        distance, novel = novel_codes(head, codes)
    return Assessment(conf, calibrated, unsure, novel, distance)


def has_novelty(head: LinearHead) -> bool:
    """Whether the head carries a novelty check: reference codes and a threshold (heads
    trained before tlflow recorded them have neither)."""
    return head.reference is not None and head.meta.novelty is not None


def novel_codes(head: LinearHead, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance (N,), novel (N,) bool) of raw codes (N, D) of the head's layer: the k-th
    nearest neighbour's distance to the head's reference codes in its novelty space, and
    whether it lies beyond the threshold train set on val (novelty.py; Sun et al. 2022).
    Raises ValueError when the head has no novelty check (`has_novelty`) or the codes' width
    is not the head's."""
    if not has_novelty(head):
        raise ValueError("the head carries no novelty reference")
    codes = np.asarray(codes, dtype=np.float32)
    if codes.ndim != 2 or codes.shape[1] != head.mean.shape[0]:
        raise ValueError(f"codes of shape {codes.shape}; the head reads "
                         f"(N, {head.mean.shape[0]})")
    if not len(codes):
        return np.zeros(0, np.float32), np.zeros(0, bool)
    nov = head.meta.novelty
    distance = novelty.kth_distance(novelty_space(head, head.reference),
                                    novelty_space(head, codes), nov.k)
    return distance, novelty.is_novel(distance, nov.threshold)


# ---------------------------------------------------------------- scored by evaluate


def calibration_scores(logits: np.ndarray, y_idx: np.ndarray, meta: ModelMeta,
                       probabilities: bool) -> tuple[dict, Coverage]:
    """On the test split (logits (N, K), true class indices (N,)): {ece, ece_t}
    (each only when there are such probabilities) and the accuracy-coverage rows at
    calibration.COVERAGE_AT (plots/coverage.csv; none for uncalibrated decision values), from
    the calibrated confidence (the model's own without a temperature)."""
    out: dict[str, float] = {}
    if probabilities:
        out["ece"] = calibration.expected_calibration_error(calibration.softmax(logits), y_idx)
    t = temperature(meta)
    if t is not None:
        out["ece_t"] = calibration.expected_calibration_error(
            calibration.softmax(logits, t), y_idx)
    conf, _ = confidence(logits, meta, probabilities)
    if conf is None:
        return out, Coverage(rows=())
    return out, Coverage(rows=tuple(CoverageRow.model_validate(r) for r in
                                    calibration.coverage_table(conf, logits.argmax(axis=1)
                                                               == y_idx)))
