"""Scoring on the test split: accuracy, macro F1, per-class table, per-image predictions
(top-k, loss, right or wrong), the confusion matrix as DVC's CSV and as a PNG."""

from __future__ import annotations

import csv

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score

from tlflow.tasks.lib.core.files import atomic_path
from tlflow.tasks.lib.core.handoff.evaluate import ImagePrediction
from tlflow.tasks.lib.data.manifest import Row

TOP_K = 3  # labels kept per image in the predictions table


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, macro F1 and a per-class table (precision, recall, f1, support)."""
    report = classification_report(
        y_true, y_pred, labels=list(classes), output_dict=True, zero_division=0
    )
    per_class = {
        c: {k: (int(v) if k == "support" else float(v)) for k, v in report[c].items()}
        for c in classes
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(classes), average="macro",
                                   zero_division=0)),
        "n": len(y_true),
        "per_class": per_class,
    }


def losses(scores: np.ndarray, true_index: np.ndarray, kind: str) -> np.ndarray:
    """Per-image loss (N,) on the true class: cross-entropy -log p_y for probabilities (p_y
    floored at 1e-12, so a class the model never saw costs 27.6), the multiclass hinge
    max(0, 1 + max_{j != y} s_j - s_y) (Crammer and Singer) for a linear SVM's decision values.
    `true_index` is -1 for a label the model does not know."""
    n = len(scores)
    known = true_index >= 0
    if kind == "probability":
        p_true = np.where(known, scores[np.arange(n), np.maximum(true_index, 0)], 0.0)
        return -np.log(np.maximum(p_true, 1e-12))
    s_true = np.where(known, scores[np.arange(n), np.maximum(true_index, 0)], -np.inf)
    others = scores.copy()
    others[np.arange(n)[known], true_index[known]] = -np.inf
    return np.maximum(0.0, 1.0 + others.max(axis=1) - s_true)


def image_predictions(model: str, rows: list[Row], scores: np.ndarray,
                      classes: tuple[str, ...], kind: str,
                      k: int = TOP_K) -> list[ImagePrediction]:
    """One ImagePrediction per row from the model's scores (N, K) over `classes`: the k best
    labels (ties to the first class), the loss (`losses`), right or wrong (the top label, as
    the metrics count it)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    index = {c: i for i, c in enumerate(classes)}
    true_index = np.array([index.get(r.label, -1) for r in rows], dtype=np.int64)
    loss = losses(scores, true_index, kind)
    names = np.asarray(classes)
    return [ImagePrediction(model=model, relpath=r.relpath, sha256=r.sha256, label=r.label,
                            top=tuple(str(n) for n in names[o]),
                            scores=tuple(float(v) for v in scores[i, o]), kind=kind,
                            loss=float(loss[i]), correct=bool(names[o[0]] == r.label))
            for i, (r, o) in enumerate(zip(rows, order, strict=True))]


def write_confusion(dest, y_true: np.ndarray, y_pred: np.ndarray,
                    relpaths: list[str] | None = None) -> None:
    """One row per test image (actual, predicted, relpath): the shape DVC's confusion
    template reads (it counts rows by actual and predicted; the path names the image)."""
    relpaths = [""] * len(y_true) if relpaths is None else relpaths
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("actual", "predicted", "relpath"))
        w.writerows(zip(y_true, y_pred, relpaths, strict=True))


def plot_confusion(dest, panels: list[tuple[np.ndarray, np.ndarray, str]],
                   classes: tuple[str, ...]) -> None:
    """The confusion matrices as one PNG (scikit-learn's display), one panel per model
    (y_true, y_pred, title), side by side, for `dvc plots show` and the run's artifact."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    side = min(4.0 + 0.45 * len(classes), 24.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels), side), squeeze=False)
    for ax, (y_true, y_pred, title) in zip(axes[0], panels, strict=True):
        ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(classes), ax=ax,
                                                colorbar=False, xticks_rotation="vertical")
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
