"""Linear probes on cached codes: the estimators, the (layer, C) sweep on val, the export to
a LinearHead.

The linear-probe protocol: for each layer in the store and each C in the grid, fit on train
and score on val (or by k-fold CV on train when there is no val split); the best (layer, C)
is refit on train + val. `logistic` and `linear_svm` hold one layer's codes in memory (here);
`sgd` streams them from the store (tasks/lib/probe/sgd.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.train import SweepRow
from tlflow.tasks.lib.core.params import Train
from tlflow.tasks.lib.data.manifest import Row
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.probe.head import HeadMeta, LinearHead


@dataclass(frozen=True)
class Split:
    """Codes of one layer for the train and val splits (val may be empty when cv is set)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def make_norm(normalize: str) -> TransformerMixin:
    """The feature normalization, unfitted: standardize | l2 | none."""
    return {"standardize": StandardScaler, "l2": Normalizer,
            "none": FunctionTransformer}[normalize]()


def make_clf(C: float, cfg: Train, seed: int, warm_start: bool = False):
    """The in-memory linear classifier; warm_start reuses the last fit's weights."""
    if cfg.classifier == "logistic":  # multinomial softmax, L-BFGS
        return LogisticRegression(C=C, max_iter=cfg.max_iter, class_weight=cfg.class_weight,
                                  random_state=seed, warm_start=warm_start)
    if cfg.classifier == "linear_svm":  # liblinear: no warm start
        return LinearSVC(C=C, max_iter=cfg.max_iter, class_weight=cfg.class_weight,
                         random_state=seed)
    raise TlflowError(f"train.classifier: {cfg.classifier} streams its codes "
                      "(tasks/lib/probe/sgd.py)")


def make_probe(C: float, cfg: Train, seed: int) -> Pipeline:
    """Normalization (fit on the data it is fitted on) then the linear classifier."""
    return Pipeline([("norm", make_norm(cfg.normalize)), ("clf", make_clf(C, cfg, seed))])


def _layer_accuracies(s: Split, cfg: Train, seed: int) -> dict[float, float]:
    """Val (or k-fold CV) accuracy for each C of the grid.

    With a val split the normalization is fitted once on train, and C goes from small to
    large with warm starts: each fit starts from the last one's weights (the regularization
    path), which L-BFGS finishes in a fraction of the iterations of a cold start.
    """
    if not len(s.y_val):
        folds = StratifiedKFold(cfg.cv, shuffle=True, random_state=seed)
        return {C: float(cross_val_score(make_probe(C, cfg, seed), s.x_train, s.y_train,
                                         cv=folds).mean()) for C in cfg.C_grid}
    norm = make_norm(cfg.normalize).fit(s.x_train)
    x_train, x_val = norm.transform(s.x_train), norm.transform(s.x_val)
    clf, out = None, {}
    for C in sorted(cfg.C_grid):
        clf = make_clf(C, cfg, seed, warm_start=True) if clf is None else clf.set_params(C=C)
        out[C] = float(clf.fit(x_train, s.y_train).score(x_val, s.y_val))
    return out


def sweep(splits: dict[str, Split], cfg: Train, seed: int) -> list[SweepRow]:
    """Val (or CV) accuracy of every (layer, C); one row per pair, C in grid order."""
    table = []
    for layer, s in splits.items():
        acc = _layer_accuracies(s, cfg, seed)
        table += [SweepRow(layer=layer, dim=int(s.x_train.shape[1]), C=C,
                           val_accuracy=acc[C]) for C in cfg.C_grid]
    return table


def layer_table(table: list[SweepRow]) -> list[SweepRow]:
    """The sweep reduced to one row per layer: dim, best C, its val accuracy."""
    layers = dict.fromkeys(r.layer for r in table)
    return [best([r for r in table if r.layer == layer]) for layer in layers]


def best(table: list[SweepRow]) -> SweepRow:
    """Highest val accuracy; ties go to the first row (layers in store order, C in grid order)."""
    return max(table, key=lambda r: r.val_accuracy)


def to_head(probe: Pipeline, meta: HeadMeta) -> LinearHead:
    """Export a fitted normalization + linear classifier pipeline as plain tensors; the head's
    record is `meta` with what the pipeline says (normalize, scores) added."""
    norm, clf = probe.named_steps["norm"], probe.named_steps["clf"]
    w, b = clf.coef_, clf.intercept_
    if w.shape[0] == 1:  # binary: sklearn keeps one logit; softmax over (-z/2, z/2) is sigmoid(z)
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    dim = w.shape[1]
    if isinstance(norm, StandardScaler):
        mean, scale, kind = norm.mean_, norm.scale_, "standardize"
    else:
        mean, scale = np.zeros(dim), np.ones(dim)
        kind = "l2" if isinstance(norm, Normalizer) else "none"
    scores = _scores(clf, len(clf.classes_))
    return LinearHead(w, b, mean, scale, tuple(map(str, clf.classes_)),
                      meta.with_(normalize=kind, scores=scores))


def _scores(clf, n_classes: int) -> str:
    """What the head's scores mean: softmax probabilities, one-vs-rest ones, or SVM margins."""
    if isinstance(clf, LogisticRegression):
        return "probability"
    if isinstance(clf, SGDClassifier) and clf.loss == "log_loss":
        # binary: one logit, exported as a two-way softmax, which is the sigmoid exactly
        return "probability" if n_classes == 2 else "ovr_probability"
    return "decision"


def load_splits(store: FeatureStore, rows: list[Row],
                cv: int | None) -> tuple[dict[str, Split], np.ndarray]:
    """Per-layer codes of train and val; also the labels of both, for the refit."""
    tr = [r for r in rows if r.split == "train"]
    va = [r for r in rows if r.split == "val"]
    if not va and cv is None:
        raise TlflowError("train: the val split is empty; set ingest.val_fraction above 0 "
                          "or train.cv to a number of folds")
    y_tr = np.array([r.label for r in tr])
    y_va = np.array([r.label for r in va])
    splits = {
        layer: Split(store.read(layer, (r.sha256 for r in tr)), y_tr,
                     store.read(layer, (r.sha256 for r in va)), y_va)
        for layer in store.layers
    }
    return splits, np.concatenate([y_tr, y_va])


Refit = Callable[[SweepRow], Pipeline]  # the chosen sweep row -> a probe fitted on train + val


def sweep_in_memory(path: Path, rows: list[Row], cfg: Train,
                     seed: int) -> tuple[list[SweepRow], Refit]:
    """The sweep for logistic and linear_svm: codes of train and val loaded per layer."""
    with FeatureStore(path) as store:
        splits, y_all = load_splits(store, rows, cfg.cv)

    def refit(top: SweepRow) -> Pipeline:
        s = splits[top.layer]
        return make_probe(top.C, cfg, seed).fit(np.vstack([s.x_train, s.x_val]), y_all)

    return sweep(splits, cfg, seed), refit


def val_set_id(rows: list[Row]) -> str:
    """Names the val split (its image hashes): val accuracies compare only on the same one."""
    keys = sorted(r.sha256 for r in rows if r.split == "val")
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
