"""Train: a linear probe on the cached codes, C and layer chosen on the val split.

Multinomial logistic regression on standardized codes. For each layer in the store and each
C in the grid, fit on train and score on val; the best (layer, C) is refit on train + val.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tasks.errors import TlflowError
from tasks.extract import current_store, usable
from tasks.featurestore import FeatureStore
from tasks.head import LinearHead, save_head
from tasks.ingest import Row, read_manifest
from tasks.io import write_json
from tasks.params import Params, Train


@dataclass(frozen=True)
class Split:
    """Codes of one layer for the train and val splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def make_probe(C: float, cfg: Train, seed: int) -> Pipeline:
    """Standardize then multinomial logistic regression (L-BFGS)."""
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=cfg.max_iter, random_state=seed)
    )


def sweep(splits: dict[str, Split], cfg: Train, seed: int) -> list[dict]:
    """Val accuracy of every (layer, C); one row per pair."""
    table = []
    for layer, s in splits.items():
        for C in cfg.C_grid:
            acc = make_probe(C, cfg, seed).fit(s.x_train, s.y_train).score(s.x_val, s.y_val)
            table.append({"layer": layer, "dim": int(s.x_train.shape[1]), "C": C,
                          "val_accuracy": float(acc)})
    return table


def best(table: list[dict]) -> dict:
    """Highest val accuracy; ties go to the first row (layers in store order, C in grid order)."""
    return max(table, key=lambda r: r["val_accuracy"])


def to_head(probe: Pipeline, meta: dict) -> LinearHead:
    """Export a fitted scaler + logistic pipeline as plain tensors."""
    scaler, clf = probe[0], probe[-1]
    w, b = clf.coef_, clf.intercept_
    if w.shape[0] == 1:  # binary: sklearn keeps one logit; softmax over (-z/2, z/2) is sigmoid(z)
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    return LinearHead(w, b, scaler.mean_, scaler.scale_, tuple(map(str, clf.classes_)), meta)


def load_splits(store: FeatureStore, rows: list[Row]) -> tuple[dict[str, Split], np.ndarray]:
    """Per-layer codes of train and val; also the labels of both, for the refit."""
    tr = [r for r in rows if r.split == "train"]
    va = [r for r in rows if r.split == "val"]
    if not va:
        raise TlflowError("train: the val split is empty; set ingest.val_fraction above 0")
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
        splits, y_all = load_splits(store, rows)
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
