"""Evaluate: the probe (and the fine-tuned network, when there is one) on the test split,
touched once. Metrics JSON (a few numbers per model), the per-class table, confusion CSV
and PNG (tasks/lib/evaluation.py); the unreadable images it leaves out are listed on stdout
and in the extract report."""

from __future__ import annotations

import numpy as np

from tasks.lib.errors import TlflowError
from tasks.lib.evaluation import plot_confusion, score, write_confusion
from tasks.lib.featurestore import FeatureStore
from tasks.lib.handoff import (
    current_store,
    read_extract_report,
    write_eval_metrics,
    write_per_class,
)
from tasks.lib.head import load_head
from tasks.lib.manifest import Row, read_manifest
from tasks.lib.network import read_meta
from tasks.lib.params import Params

# what this stage reads besides base.paths (dvc.yaml: params): where and how many images
# at a time the fine-tuned network scores
PARAMS = ("finetune.device", "finetune.batch_size")


def score_finetuned(params: Params, test: list[Row], y_true: np.ndarray) -> dict | None:
    """The fine-tuned network's scores on the test images; None when finetune is off."""
    paths = params.base.paths
    if not read_meta(paths.finetuned).get("enabled"):
        return None
    from tasks.lib.finetuning import finetuned_probabilities
    from tasks.lib.network import load_network

    net = load_network(paths.finetuned)
    proba = finetuned_probabilities(net, [paths.images / r.relpath for r in test],
                                    params.finetune.device, params.finetune.batch_size)
    return score(y_true, np.asarray(net.classes)[proba.argmax(axis=1)], net.classes)


def run(params: Params) -> dict:
    """Score the probe on the test split; write the metrics, the per-class table and the
    confusion matrix. Returns the scores with their per-class tables."""
    paths = params.base.paths
    bad = read_extract_report(paths.extract_report).bad
    rows = read_manifest(paths.manifest)
    test = [r for r in rows if r.split == "test" and r.sha256 not in bad]
    if not test:
        raise TlflowError("evaluate: the test split is empty; set ingest.test_fraction above 0")
    path = current_store(paths.features)
    head = load_head(paths.head, extractor_id=path.stem)
    with FeatureStore(path) as store:
        y_pred = head.predict(store.read(head.meta["layer"], [r.sha256 for r in test]))
    y_true = np.array([r.label for r in test])
    skipped = sorted({r.relpath: bad[r.sha256] for r in rows if r.sha256 in bad}.items())
    metrics = {"probe": score(y_true, y_pred, head.classes)}
    finetuned = score_finetuned(params, test, y_true)
    if finetuned is not None:
        metrics["finetune"] = finetuned
    write_eval_metrics(paths.eval_metrics, metrics)
    write_per_class(paths.per_class, metrics)
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
