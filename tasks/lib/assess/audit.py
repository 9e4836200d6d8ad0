"""Data checks from the cached codes, no forward pass: near-copies of train images in val and
test (a leak), one file under two labels, likely label errors, and the class balance.

They inform: nothing here changes the data or the model. Each check returns a JSON-ready dict
that names every image by its relpath (and sha256); the audit stage writes them to reports/.

- Near-duplicates: cosine similarity of the codes, centred on the train images' mean (raw
  pooled codes are non-negative, so any two photos score high; centring leaves what sets an
  image apart), between each val / test image and each train image; a pair above the
  threshold is listed. The threshold adapts upwards to the data: it is at least the 0.99
  quantile of the train images' similarity to their nearest other train image, so a leak is
  a pair closer than 99 % of train images are to their own neighbour (digits' 8 x 8 scans of
  one class score 0.93 there, distinct photos of hymenoptera 0.64, below the 0.8 default).
  Identical files (the same sha256) score 1 and are marked exact.
- Label conflicts: one sha256 (the same bytes) under more than one label in the manifest.
- Likely label errors: out-of-fold probabilities on train + val from a k-fold of the probe
  (the layer train chose, train.normalize, a logistic classifier), averaged over the probes
  of train.C_grid, then confident learning (Northcutt, Jiang and Chuang 2021) as cleanlab
  implements it (`cleanlab.filter.find_label_issues`, prune by noise rate), ranked by
  self-confidence. The average over the grid, not the one C train chose: C is chosen for
  val accuracy, which is flat across the grid on small sets, so the smallest C wins and its
  probabilities shrink towards the class prior; a flipped label then keeps a high
  probability and confident learning misses it (hymenoptera, 5 flipped train labels: the
  chosen C = 0.01 alone finds 2, the grid's average 3, with 9 images listed; 1 on the
  unflipped set). An ensemble of models is what cleanlab advises for better probabilities
  (`cleanlab.rank.get_label_quality_ensemble_scores`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tlflow.tasks.lib.core.params import Train
from tlflow.tasks.lib.data.manifest import SPLITS, Row
from tlflow.tasks.lib.probe.sweep import make_clf, make_norm

QUERY_SPLITS = ("val", "test")  # compared against train for leaks
_BLOCK_CELLS = 1 << 24  # similarity entries computed at once (64 MiB of float32)
TYPICAL_QUANTILE = 0.99  # of train images' similarity to their nearest train neighbour
_TYPICAL_SAMPLE = 2000  # train images whose nearest neighbour measures that quantile


def _image(r: Row) -> dict[str, str]:
    return {"relpath": r.relpath, "sha256": r.sha256, "label": r.label, "split": r.split}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def typical_similarity(t: np.ndarray, seed: int = 0) -> float:
    """The TYPICAL_QUANTILE of unit codes t (N, D)'s similarity to their nearest other row
    (at most _TYPICAL_SAMPLE rows sampled against all N); -1 with fewer than 2 rows."""
    if len(t) < 2:
        return -1.0
    rows = np.random.default_rng(seed).permutation(len(t))[:_TYPICAL_SAMPLE]
    nearest = []
    step = max(1, _BLOCK_CELLS // len(t))
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        sim = t[block] @ t.T
        sim[np.arange(len(block)), block] = -np.inf  # not itself
        nearest.append(sim.max(axis=1))
    return float(np.quantile(np.concatenate(nearest), TYPICAL_QUANTILE))


def near_duplicates(codes: dict[str, np.ndarray], rows: list[Row], threshold: float,
                    max_listed: int) -> dict:
    """Pairs (val or test image, train image) whose centred codes' cosine similarity is at
    least the threshold, most similar first: `threshold`, or the train images' typical
    nearest-neighbour similarity (typical_similarity) where that is higher. `codes` maps
    sha256 -> code (D,); rows without a code are left out. Returns {threshold (the one
    applied), train_typical, count, pairs (at most max_listed)}; memory is bounded by
    computing the similarities a block of val / test images at a time."""
    train = [r for r in rows if r.split == "train" and r.sha256 in codes]
    query = [r for r in rows if r.split in QUERY_SPLITS and r.sha256 in codes]
    pairs: list[tuple[float, Row, Row]] = []
    typical = -1.0
    if train and query:
        x_train = np.stack([codes[r.sha256] for r in train]).astype(np.float32)
        mean = x_train.mean(axis=0)
        t = _unit(x_train - mean)
        typical = typical_similarity(t)
        threshold = max(threshold, typical)
        q = _unit(np.stack([codes[r.sha256] for r in query]).astype(np.float32) - mean)
        step = max(1, _BLOCK_CELLS // len(train))
        for start in range(0, len(query), step):
            sim = q[start:start + step] @ t.T
            for i, j in zip(*np.nonzero(sim >= threshold - 1e-6), strict=True):
                pairs.append((float(sim[i, j]), query[start + i], train[j]))
    pairs.sort(key=lambda p: (-p[0], p[1].relpath, p[2].relpath))
    listed = [{"similarity": round(min(s, 1.0), 4), "exact": a.sha256 == b.sha256,
               "image": _image(a), "train_image": _image(b)} for s, a, b in pairs[:max_listed]]
    return {"threshold": round(threshold, 4), "train_typical": round(typical, 4),
            "count": len(pairs), "pairs": listed}


def identical_files(rows: list[Row], max_listed: int) -> dict:
    """Files with the same bytes (one sha256) under several relpaths, in one class or across
    classes, empty files included: {count (groups), files (in them), groups}. Each group
    names every file, its labels and splits; `crosses_splits` marks a group with copies on
    both sides of train / val / test (possible only where the source gives the split: a
    split drawn by hash puts every copy in one split)."""
    by_hash: dict[str, list[Row]] = {}
    for r in rows:
        by_hash.setdefault(r.sha256, []).append(r)
    groups = [{"sha256": h, "labels": sorted({r.label for r in rs}),
               "splits": sorted({r.split for r in rs}),
               "crosses_splits": len({r.split for r in rs}) > 1,
               "images": [_image(r) for r in sorted(rs, key=lambda r: r.relpath)]}
              for h, rs in sorted(by_hash.items(), key=lambda kv: min(r.relpath for r in kv[1]))
              if len(rs) > 1]
    return {"count": len(groups), "files": sum(len(g["images"]) for g in groups),
            "groups": groups[:max_listed]}


def label_conflicts(rows: list[Row], max_listed: int) -> dict:
    """Identical files (one sha256) given different labels: {count, groups}."""
    by_hash: dict[str, list[Row]] = {}
    for r in rows:
        by_hash.setdefault(r.sha256, []).append(r)
    groups = [{"sha256": h, "labels": sorted({r.label for r in rs}),
               "images": [_image(r) for r in sorted(rs, key=lambda r: r.relpath)]}
              for h, rs in sorted(by_hash.items()) if len({r.label for r in rs}) > 1]
    return {"count": len(groups), "groups": groups[:max_listed]}


@dataclass(frozen=True)
class ProbeSetting:
    """The probe protocol the out-of-fold probabilities follow (train's choice and params)."""

    layer: str
    Cs: tuple[float, ...]  # the probes whose out-of-fold probabilities are averaged
    normalize: str
    max_iter: int
    class_weight: str | None


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...],
                              probe: ProbeSetting, folds: int, seed: int) -> np.ndarray:
    """P(class | image) (N, K) for each image from probes that did not see it, averaged over
    `probe.Cs`: stratified k-fold (k = folds, at most the largest class's size); a class
    absent from a fold's training part gets probability 0 there."""
    from sklearn.model_selection import StratifiedKFold

    cfg = Train(classifier="logistic", normalize=probe.normalize, max_iter=probe.max_iter,
                class_weight=probe.class_weight)
    k = max(2, min(folds, max(Counter(y.tolist()).values())))
    column = {c: i for i, c in enumerate(classes)}
    proba = np.zeros((len(y), len(classes)))
    with warnings.catch_warnings():  # small classes (fewer members than folds), convergence
        warnings.simplefilter("ignore")
        for fit, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
            if len(set(y[fit])) < 2:
                proba[held, [column[v] for v in y[held]]] = 1.0  # nothing to tell apart
                continue
            norm = make_norm(cfg.normalize).fit(x[fit])
            x_fit, x_held = norm.transform(x[fit]), norm.transform(x[held])
            clf = None
            for C in sorted(probe.Cs):  # the regularization path, warm-started (as train)
                clf = make_clf(C, cfg, seed, warm_start=True) if clf is None \
                    else clf.set_params(C=C)
                clf.fit(x_fit, y[fit])
                cols = [column[c] for c in clf.classes_]
                proba[np.ix_(held, cols)] += clf.predict_proba(x_held) / len(probe.Cs)
    return proba


def label_issues(rows: list[Row], x: np.ndarray, probe: ProbeSetting, folds: int, seed: int,
                 max_listed: int) -> dict:
    """Likely label errors among `rows` (train + val) with codes x (N, D): confident learning
    on out-of-fold probabilities, the least self-confident first. Each listed image has its
    given label, the label the probes suggest, and both probabilities; `oof_accuracy` is how
    often the out-of-fold probes agree with the given labels (below tlflow.flows.html_report's
    WEAK_PROBE the page warns that the list holds the probes' own mistakes)."""
    labels = np.array([r.label for r in rows])
    classes = tuple(sorted(set(labels.tolist())))
    head = {"method": "confident learning (cleanlab.filter.find_label_issues, "
                      "prune_by_noise_rate) on out-of-fold probabilities averaged over C",
            "layer": probe.layer, "C": list(probe.Cs), "checked": len(rows)}
    if len(classes) < 2 or len(rows) < 2 * len(classes):
        return {**head, "folds": 0, "count": 0, "images": [],
                "skipped": f"too few images to cross-validate ({len(rows)}, "
                           f"{len(classes)} classes)"}
    proba = out_of_fold_probabilities(x, labels, classes, probe, folds, seed)
    given = np.searchsorted(np.asarray(classes), labels)
    flagged = _confident_learning(given, proba)
    images = [{**_image(rows[i]), "suggested": classes[int(proba[i].argmax())],
               "p_label": round(float(proba[i, given[i]]), 4),
               "p_suggested": round(float(proba[i].max()), 4)} for i in flagged]
    k = max(2, min(folds, max(Counter(labels.tolist()).values())))
    oof = round(float((proba.argmax(axis=1) == given).mean()), 4)
    return {**head, "folds": k, "oof_accuracy": oof, "count": len(images),
            "images": images[:max_listed]}


def _confident_learning(given: np.ndarray, proba: np.ndarray) -> list[int]:
    """Indices cleanlab flags as label issues, ranked by self-confidence (lowest first)."""
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = find_label_issues(given, proba, filter_by="prune_by_noise_rate",
                                   return_indices_ranked_by="self_confidence", n_jobs=1)
    return [int(i) for i in ranked]


def balance(rows: list[Row]) -> dict:
    """Images per class and split; per split the ratio of the largest class to the smallest
    (null when a class is missing there) and the classes it lacks."""
    classes = sorted({r.label for r in rows})
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for r in rows:
        counts[r.split][r.label] += 1
    out = {"classes": classes, "splits": counts, "imbalance": {}, "missing": {}}
    for s, per in counts.items():
        present = [n for n in per.values() if n]
        out["missing"][s] = [c for c, n in per.items() if not n] if present else []
        out["imbalance"][s] = (round(max(present) / min(present), 3)
                               if present and len(present) == len(per) else None)
    return out
