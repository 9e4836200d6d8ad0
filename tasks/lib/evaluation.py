"""Scoring on the test split: accuracy, macro F1, per-class table, the confusion matrix as
DVC's CSV and as a PNG."""

from __future__ import annotations

import csv

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score

from tasks.lib.files import atomic_path


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


def write_confusion(dest, y_true: np.ndarray, y_pred: np.ndarray) -> None:
    """One row per test image (actual, predicted): the shape DVC's confusion template reads."""
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("actual", "predicted"))
        w.writerows(zip(y_true, y_pred, strict=True))


def plot_confusion(dest, y_true: np.ndarray, y_pred: np.ndarray,
                   classes: tuple[str, ...], title: str) -> None:
    """The confusion matrix as a PNG (scikit-learn's display), for `dvc plots show`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    side = min(4.0 + 0.45 * len(classes), 24.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(classes), ax=ax,
                                            colorbar=False, xticks_rotation="vertical")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
