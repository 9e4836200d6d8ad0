"""Train: a linear probe on the cached codes, C and layer chosen on the val split.

The linear-probe protocol: for each layer in the store and each C in the grid, fit on train
and score on val (or by k-fold CV on train when there is no val split); the best (layer, C)
is refit on train + val. The test split is touched once, in evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from tasks.errors import TlflowError
from tasks.extract import current_store, usable
from tasks.featurestore import FeatureStore
from tasks.head import LinearHead, save_head
from tasks.ingest import Row, read_manifest
from tasks.io import write_json
from tasks.params import Params, Train


@dataclass(frozen=True)
class Split:
    """Codes of one layer for the train and val splits (val may be empty when cv is set)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def make_probe(C: float, cfg: Train, seed: int) -> Pipeline:
    """Normalization (fit on the data it is fitted on) then the linear classifier."""
    norm = {"standardize": StandardScaler(), "l2": Normalizer(), "none": "passthrough"}
    if cfg.classifier == "logistic":  # multinomial softmax, L-BFGS
        clf = LogisticRegression(C=C, max_iter=cfg.max_iter, class_weight=cfg.class_weight,
                                 random_state=seed)
    else:
        clf = LinearSVC(C=C, max_iter=cfg.max_iter, class_weight=cfg.class_weight,
                        random_state=seed)
    return Pipeline([("norm", norm[cfg.normalize]), ("clf", clf)])


def _val_accuracy(s: Split, C: float, cfg: Train, seed: int) -> float:
    if len(s.y_val):
        return float(make_probe(C, cfg, seed).fit(s.x_train, s.y_train).score(s.x_val, s.y_val))
    folds = StratifiedKFold(cfg.cv, shuffle=True, random_state=seed)
    return float(cross_val_score(make_probe(C, cfg, seed), s.x_train, s.y_train, cv=folds).mean())


def sweep(splits: dict[str, Split], cfg: Train, seed: int) -> list[dict]:
    """Val (or CV) accuracy of every (layer, C); one row per pair."""
    return [
        {"layer": layer, "dim": int(s.x_train.shape[1]), "C": C,
         "val_accuracy": _val_accuracy(s, C, cfg, seed)}
        for layer, s in splits.items()
        for C in cfg.C_grid
    ]


def best(table: list[dict]) -> dict:
    """Highest val accuracy; ties go to the first row (layers in store order, C in grid order)."""
    return max(table, key=lambda r: r["val_accuracy"])


def to_head(probe: Pipeline, meta: dict) -> LinearHead:
    """Export a fitted normalization + linear classifier pipeline as plain tensors."""
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
    scores = "probability" if isinstance(clf, LogisticRegression) else "decision"
    meta = {**meta, "normalize": kind, "scores": scores}
    return LinearHead(w, b, mean, scale, tuple(map(str, clf.classes_)), meta)


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


def run(params: Params) -> LinearHead:
    """Sweep layers and C on val, refit the best on train + val, save head and sweep table."""
    cfg, paths, seed = params.train, params.base.paths, params.base.seed
    rows = usable(read_manifest(paths.manifest), paths.extract_report)
    path = current_store(paths.features)
    with FeatureStore(path) as store:
        splits, y_all = load_splits(store, rows, cfg.cv)
        ext_id = path.stem
    table = sweep(splits, cfg, seed)
    top = best(table)
    s = splits[top["layer"]]
    probe = make_probe(top["C"], cfg, seed).fit(np.vstack([s.x_train, s.x_val]), y_all)
    meta = {"classifier": cfg.classifier, "layer": top["layer"], "extractor_id": ext_id,
            "C": top["C"], "val_accuracy": top["val_accuracy"]}
    head = to_head(probe, meta)
    save_head(head, paths.head)
    write_json(paths.probe_metrics, {"best": meta, "sweep": table})
    print(f"train: best layer {top['layer']} (C={top['C']:g}), val accuracy "
          f"{top['val_accuracy']:.4f} -> {paths.head}", flush=True)
    return head
