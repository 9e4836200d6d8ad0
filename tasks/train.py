"""Train: a linear probe on the cached codes, C and layer chosen on the val split.

The linear-probe protocol: for each layer in the store and each C in the grid, fit on train
and score on val (or by k-fold CV on train when there is no val split); the best (layer, C)
is refit on train + val. The test split is touched once, in evaluate.

`logistic` and `linear_svm` hold one layer's codes in memory; `sgd` streams them from the
store (tasks/stream.py), for stores larger than memory.
"""

from __future__ import annotations

import hashlib
import json
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

from tasks.errors import TlflowError
from tasks.featurestore import FeatureStore, current_store, usable
from tasks.head import LinearHead, load_head, meta_path, save_head
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
    raise TlflowError(f"train.classifier: {cfg.classifier} streams its codes (tasks/stream.py)")


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


def sweep(splits: dict[str, Split], cfg: Train, seed: int) -> list[dict]:
    """Val (or CV) accuracy of every (layer, C); one row per pair, C in grid order."""
    table = []
    for layer, s in splits.items():
        acc = _layer_accuracies(s, cfg, seed)
        table += [{"layer": layer, "dim": int(s.x_train.shape[1]), "C": C,
                   "val_accuracy": acc[C]} for C in cfg.C_grid]
    return table


def layer_table(table: list[dict]) -> list[dict]:
    """The sweep reduced to one row per layer: dim, best C, its val accuracy."""
    layers = dict.fromkeys(r["layer"] for r in table)
    return [best([r for r in table if r["layer"] == layer]) for layer in layers]


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
    scores = _scores(clf, len(clf.classes_))
    meta = {**meta, "normalize": kind, "scores": scores}
    return LinearHead(w, b, mean, scale, tuple(map(str, clf.classes_)), meta)


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


Refit = Callable[[dict], Pipeline]  # the chosen sweep row -> a probe fitted on train + val


def _sweep_stream(path, rows: list[Row], layers: dict[str, int], cfg: Train,
                  seed: int) -> tuple[list[dict], Refit]:
    """The sweep for `sgd`: every (layer, C) trained on codes streamed from the store."""
    from tasks import stream

    train_set = {r.sha256: r.label for r in rows if r.split == "train"}
    val_set = {r.sha256: r.label for r in rows if r.split == "val"}
    if not val_set:
        raise TlflowError("train: the val split is empty; classifier sgd needs one "
                          "(set ingest.val_fraction above 0)")
    table = []
    for layer, dim in layers.items():
        tr = stream.Stream(path, layer, train_set, cfg.buffer_rows)
        va = stream.Stream(path, layer, val_set, cfg.buffer_rows)
        norm = stream.fit_norm(tr, cfg.normalize)  # one pass, shared by every C
        for C in cfg.C_grid:
            acc = stream.accuracy(stream.probe(tr, C, cfg, seed, norm), va)
            table.append({"layer": layer, "dim": dim, "C": C, "val_accuracy": acc})
            print(f"train: {layer} C={C:g} val accuracy {acc:.4f}", flush=True)

    def refit(top: dict) -> Pipeline:
        both = stream.Stream(path, top["layer"], {**train_set, **val_set}, cfg.buffer_rows)
        return stream.probe(both, top["C"], cfg, seed)

    return table, refit


def _sweep_in_memory(path, rows: list[Row], cfg: Train,
                     seed: int) -> tuple[list[dict], Refit]:
    """The sweep for logistic and linear_svm: codes of train and val loaded per layer."""
    with FeatureStore(path) as store:
        splits, y_all = load_splits(store, rows, cfg.cv)

    def refit(top: dict) -> Pipeline:
        s = splits[top["layer"]]
        return make_probe(top["C"], cfg, seed).fit(np.vstack([s.x_train, s.x_val]), y_all)

    return sweep(splits, cfg, seed), refit


def choose(params: Params, rows: list[Row], table: list[dict],
           layers: list[dict]) -> tuple[dict, dict]:
    """The advice (always measured and written) and the sweep row the probe is refit from:
    the best overall, or under advise.strategy the plan's layer (pooled or an earlier one).
    `layers` is layer_table(table)."""
    from tasks import advise

    decision = advise.measure(params, rows, layers)
    carried_out = params.advise.strategy != "manual"
    layer = advise.layer_for(decision, layers) if carried_out else None
    top = best([r for r in table if layer is None or r["layer"] == layer])
    return {**decision.as_json(), "carried_out": carried_out}, top


def val_set_id(rows: list[Row]) -> str:
    """Names the val split (its image hashes): val accuracies compare only on the same one."""
    keys = sorted(r.sha256 for r in rows if r.split == "val")
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def promotion(current: dict | None, candidate: dict,
              margin: float | None) -> tuple[bool, str]:
    """Does the candidate replace the current model? Only if its val accuracy is not worse
    than the current one's by more than `margin`, when the two are comparable."""
    if margin is None:
        return True, "promotion check off (train.promote_margin: null)"
    if current is None:
        return True, "no current model"
    for key in ("extractor_id", "val_set", "classes"):
        if current.get(key) != candidate.get(key):
            return True, f"the current model has other {key}: not comparable"
    new, old = candidate["val_accuracy"], current["val_accuracy"]
    if new >= old - margin:
        return True, f"val accuracy {new:.4f} >= current {old:.4f} - margin {margin:g}"
    return False, (f"val accuracy {new:.4f} < current {old:.4f} - margin {margin:g}: "
                   "the current model stays")


def _current_meta(stem: Path) -> dict | None:
    try:
        return json.loads(meta_path(stem).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run(params: Params) -> LinearHead:
    """Sweep layers and C on val, refit the chosen one on train + val; save the head (when it
    is promoted), the sweep table and the advice."""
    cfg, paths, seed = params.train, params.base.paths, params.base.seed
    rows = usable(read_manifest(paths.manifest), paths.extract_report)
    path = current_store(paths.features)
    if cfg.classifier == "sgd":
        with FeatureStore(path) as store:
            layers = store.layers
        table, refit = _sweep_stream(path, rows, layers, cfg, seed)
    else:
        table, refit = _sweep_in_memory(path, rows, cfg, seed)
    layers = layer_table(table)
    decision, top = choose(params, rows, table, layers)
    meta = {"classifier": cfg.classifier, "layer": top["layer"], "extractor_id": path.stem,
            "C": top["C"], "val_accuracy": top["val_accuracy"], "val_set": val_set_id(rows)}
    # the classes the refit will have (scikit-learn sorts the labels): no refit to compare
    classes = sorted({r.label for r in rows if r.split in ("train", "val")})
    promoted, why = promotion(_current_meta(paths.head), {**meta, "classes": classes},
                              cfg.promote_margin)
    if promoted:
        head = to_head(refit(top), meta)
        save_head(head, paths.head)
    else:
        head = load_head(paths.head)
    decision["carried_out"] = decision["carried_out"] and promoted
    write_json(paths.probe_metrics, {"best": meta, "model": head.meta,
                                     "layers": layers, "sweep": table,
                                     "promotion": {"promoted": promoted, "why": why}})
    write_json(paths.strategy, decision)
    print(f"train: layer {top['layer']} (C={top['C']:g}), val accuracy "
          f"{top['val_accuracy']:.4f}; {'promoted' if promoted else 'not promoted'}: {why}",
          flush=True)
    print(f"train: advice: {decision['size']} and {decision['similarity']} -> "
          f"{decision['plan']}{'' if decision['carried_out'] else ' (advise.strategy: manual)'}",
          flush=True)
    return head
