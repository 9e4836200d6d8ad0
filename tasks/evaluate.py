"""Evaluate: the probe on the test split, touched once. Metrics JSON, confusion CSV and PNG."""

from __future__ import annotations

import csv

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score

from tasks.errors import TlflowError
from tasks.featurestore import FeatureStore, bad_images, current_store
from tasks.head import LinearHead, load_head
from tasks.ingest import Row, read_manifest
from tasks.io import atomic_path, write_json
from tasks.params import Params


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


def score_finetuned(params: Params, test: list[Row], y_true: np.ndarray) -> dict | None:
    """The fine-tuned network's scores on the test images; None when finetune is off."""
    from tasks.finetune import read_meta

    if not read_meta(params.base.paths.finetuned).get("enabled"):
        return None
    from tasks.network import load_network
    from tasks.tuning import finetuned_probabilities

    net = load_network(params.base.paths.finetuned)
    proba = finetuned_probabilities(params, net, [params.base.paths.images / r.relpath
                                                  for r in test])
    return score(y_true, np.asarray(net.classes)[proba.argmax(axis=1)], net.classes)


def predict_codes(head: LinearHead, store: FeatureStore, keys: list[str]) -> np.ndarray:
    """Labels the head gives to the stored codes of these image hashes."""
    return head.predict(store.read(head.meta["layer"], keys))


def run(params: Params) -> dict:
    """Score the probe on the test split; write the metrics and the confusion matrix."""
    paths = params.base.paths
    bad = bad_images(paths.extract_report)
    rows = read_manifest(paths.manifest)
    test = [r for r in rows if r.split == "test" and r.sha256 not in bad]
    if not test:
        raise TlflowError("evaluate: the test split is empty; set ingest.test_fraction above 0")
    path = current_store(paths.features)
    head = load_head(paths.head, extractor_id=path.stem)
    with FeatureStore(path) as store:
        y_pred = predict_codes(head, store, [r.sha256 for r in test])
    y_true = np.array([r.label for r in test])
    skipped = sorted({r.relpath: bad[r.sha256] for r in rows if r.sha256 in bad}.items())
    metrics = {"probe": score(y_true, y_pred, head.classes)}
    finetuned = score_finetuned(params, test, y_true)
    if finetuned is not None:
        metrics["finetune"] = finetuned
    metrics["skipped_images"] = [{"relpath": p, "reason": why} for p, why in skipped]
    write_json(paths.eval_metrics, metrics)
    write_confusion(paths.confusion, y_true, y_pred)
    p = metrics["probe"]
    if "finetune" in metrics:
        f = metrics["finetune"]
        print(f"evaluate: fine-tuned network: test accuracy {f['accuracy']:.4f}, macro F1 "
              f"{f['macro_f1']:.4f}", flush=True)
    plot_confusion(paths.confusion_png, y_true, y_pred, head.classes,
                   f"probe on {head.meta['layer']}: test accuracy {p['accuracy']:.3f}")
    print(f"evaluate: test accuracy {p['accuracy']:.4f}, macro F1 {p['macro_f1']:.4f} "
          f"on {p['n']} images -> {paths.eval_metrics}", flush=True)
    for relpath, why in skipped:
        print(f"evaluate: skipped unreadable {relpath}: {why}", flush=True)
    return metrics
