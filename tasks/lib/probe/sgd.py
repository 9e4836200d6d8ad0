"""Out-of-core linear probes: codes streamed from the feature store, a model fit by partial_fit.

Memory holds one shuffle buffer of codes (train.buffer_rows), never the whole store, so the
store may be far larger than memory. Each pass reads the store's chunks in a fresh random
order and shuffles the buffer: rows are appended in manifest order, often class by class,
and SGD needs mixed batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.train import SweepRow
from tlflow.tasks.lib.core.params import Train
from tlflow.tasks.lib.data.manifest import Row
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.probe.sweep import Refit, make_norm

MIX = 32  # a buffer gathers at least this many blocks read from random places in the store


@dataclass(frozen=True)
class Stream:
    """The codes of one layer for a labelled set of images (sha256 -> label), in buffers."""

    path: Path
    layer: str
    labels: dict[str, str]
    buffer_rows: int = 8192

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(codes, labels) buffers; shuffled chunk order and rows when a seed is given."""
        rng = None if seed is None else np.random.default_rng(seed)
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = seen = 0
        with FeatureStore(self.path) as store:
            rows = max(1, min(256, self.buffer_rows // MIX))  # 256: the store's HDF5 chunk
            order = None if rng is None else rng.permutation(store.n_blocks(rows))
            for keys, codes in store.blocks(self.layer, rows, order):
                pick = [i for i, k in enumerate(keys) if k in self.labels]
                if not pick:
                    continue
                seen += len(pick)
                xs.append(codes[pick])
                ys.append(np.array([self.labels[keys[i]] for i in pick]))
                held += len(pick)
                if held >= self.buffer_rows:
                    yield _mix(xs, ys, rng)
                    xs, ys, held = [], [], 0
        if held:
            yield _mix(xs, ys, rng)
        if seen < len(self.labels):
            raise TlflowError(f"{self.path}: {len(self.labels) - seen} image(s) have no "
                              f"{self.layer} codes (run `tlflow stage extract`)")


def _mix(xs: list[np.ndarray], ys: list[np.ndarray],
         rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.concatenate(xs), np.concatenate(ys)
    if rng is None:
        return x, y
    order = rng.permutation(len(y))
    return x[order], y[order]


def fit_norm(stream: Stream, normalize: str) -> TransformerMixin:
    """standardize: mean and scale accumulated over the stream (one pass); l2 and none are
    stateless."""
    norm = make_norm(normalize)
    if isinstance(norm, StandardScaler):
        for x, _ in stream.batches():
            norm.partial_fit(x)
    return norm


def fit_sgd(stream: Stream, norm: TransformerMixin, C: float, cfg: Train,
            seed: int) -> SGDClassifier:
    """`train.epochs` passes of partial_fit; alpha = 1 / (C n), the SVM's C per sample."""
    labels = np.array(list(stream.labels.values()))
    classes = np.unique(labels)
    weights = np.ones(len(classes))
    if cfg.class_weight == "balanced":  # as sample weights: partial_fit refuses "balanced"
        weights = compute_class_weight("balanced", classes=classes, y=labels)
    clf = SGDClassifier(loss=cfg.loss, alpha=1.0 / (C * len(stream)), random_state=seed)
    for epoch in range(cfg.epochs):
        for x, y in stream.batches(seed=seed * 7919 + epoch):
            clf.partial_fit(norm.transform(x), y, classes=classes,
                            sample_weight=weights[np.searchsorted(classes, y)])
    return clf


def accuracy(model: Pipeline, stream: Stream) -> float:
    """Share of the stream's images the model labels right."""
    right = sum(int((model.predict(x) == y).sum()) for x, y in stream.batches())
    return right / max(len(stream), 1)


def probe(stream: Stream, C: float, cfg: Train, seed: int,
          norm: TransformerMixin | None = None) -> Pipeline:
    """Normalization (fitted on the stream unless given) then SGD: the in-memory probes' shape."""
    norm = fit_norm(stream, cfg.normalize) if norm is None else norm
    return Pipeline([("norm", norm), ("clf", fit_sgd(stream, norm, C, cfg, seed))])


def sweep_stream(path: Path, rows: list[Row], layers: dict[str, int], cfg: Train,
                  seed: int) -> tuple[list[SweepRow], Refit]:
    """The sweep for `sgd`: every (layer, C) trained on codes streamed from the store."""
    train_set = {r.sha256: r.label for r in rows if r.split == "train"}
    val_set = {r.sha256: r.label for r in rows if r.split == "val"}
    if not val_set:
        raise TlflowError("train: the val split is empty; classifier sgd needs one "
                          "(set ingest.val_fraction above 0)")
    table = []
    for layer, dim in layers.items():
        tr = Stream(path, layer, train_set, cfg.buffer_rows)
        va = Stream(path, layer, val_set, cfg.buffer_rows)
        norm = fit_norm(tr, cfg.normalize)  # one pass, shared by every C
        for C in cfg.C_grid:
            acc = accuracy(probe(tr, C, cfg, seed, norm), va)
            table.append(SweepRow(layer=layer, dim=dim, C=C, val_accuracy=acc))
            print(f"train: {layer} C={C:g} val accuracy {acc:.4f}", flush=True)

    def refit(top: SweepRow) -> Pipeline:
        both = Stream(path, top.layer, {**train_set, **val_set}, cfg.buffer_rows)
        return probe(both, top.C, cfg, seed)

    return table, refit
