"""Evaluate: the probe (and the fine-tuned network, when there is one) on the test split,
touched once. Metrics JSON (a few numbers per model, the probe's expected calibration error
before and after temperature scaling among them), the per-class table, the per-image
predictions (top-3 labels with their scores, the loss, right or wrong), confusion CSVs (one
per model) and one PNG (tasks/lib/assess/evaluation.py), the probe's accuracy against coverage for
the reject option (tasks/lib/probe/trust.py); the unreadable images it leaves out are listed on
stdout and in the extract report."""

from __future__ import annotations

import numpy as np

from tlflow.tasks.lib.assess.evaluation import (
    image_predictions,
    plot_confusion,
    score,
    write_confusion,
)
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.evaluate import (
    Coverage,
    EvalMetrics,
    PerClass,
    Predictions,
    write_test_metrics,
)
from tlflow.tasks.lib.core.handoff.extract import ExtractReport, chosen_store
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.data.manifest import Row, read_manifest
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.finetune.network import read_meta
from tlflow.tasks.lib.probe.head import load_head
from tlflow.tasks.lib.probe.trust import calibration_scores, head_logits

# what this stage reads besides base.paths (dvc.yaml: params): where and how many images
# at a time the fine-tuned network scores
PARAMS = ("finetune.device", "finetune.batch_size")


def finetuned_scores(params: Params, test: list[Row]) -> tuple[np.ndarray, tuple] | None:
    """The fine-tuned network's probabilities (N, K) on the test images and its classes;
    None when finetune is off."""
    paths = params.base.paths
    if not read_meta(paths.finetuned).enabled:
        return None
    from tlflow.tasks.lib.data.decode import read_image
    from tlflow.tasks.lib.finetune.loop import finetuned_probabilities
    from tlflow.tasks.lib.finetune.network import load_network

    net = load_network(paths.finetuned)
    proba = finetuned_probabilities(net, [paths.images / r.relpath for r in test], read_image,
                                    params.finetune.device, params.finetune.batch_size)
    return proba, tuple(net.classes)


def run(params: Params) -> dict:
    """Score the probe (and the fine-tuned network) on the test split; write the metrics, the
    per-class table, the per-image predictions and the confusion matrices. Returns the
    scores with their per-class tables."""
    paths = params.base.paths
    bad = ExtractReport.read(paths.extract_report).bad
    rows = read_manifest(paths.manifest)
    test = [r for r in rows if r.split == "test" and r.sha256 not in bad]
    if not test:
        raise TlflowError("evaluate: the test split is empty; set ingest.test_fraction above 0")
    head = load_head(paths.head)
    path = chosen_store(paths.features, head.meta.extractor_id, paths.head)
    with FeatureStore(path) as store:
        codes = store.read(head.meta.layer, [r.sha256 for r in test])
    kind = "probability" if head.has_probabilities else "decision"
    probe_scores = head.predict_proba(codes) if head.has_probabilities else head.logits(codes)
    y_pred = head.predict(codes)
    y_true = np.array([r.label for r in test])
    relpaths = [r.relpath for r in test]
    skipped = sorted({r.relpath: bad[r.sha256] for r in rows if r.sha256 in bad}.items())
    metrics = {"probe": score(y_true, y_pred, head.classes)}
    index = {c: i for i, c in enumerate(head.classes)}
    ece, coverage = calibration_scores(head_logits(head, codes),
                                       np.array([index.get(y, -1) for y in y_true]),
                                       head.meta, head.has_probabilities)
    metrics["probe"].update(ece)
    preds = image_predictions("probe", test, probe_scores, head.classes, kind)
    p = metrics["probe"]
    panels = [(y_true, y_pred, f"probe on {head.meta.layer}: test accuracy "
                               f"{p['accuracy']:.3f}")]
    ft_pred = np.array([], dtype=str)
    finetuned = finetuned_scores(params, test)
    if finetuned is not None:
        proba, classes = finetuned
        ft_pred = np.asarray(classes)[proba.argmax(axis=1)]
        metrics["finetune"] = f = score(y_true, ft_pred, classes)
        # log-probabilities are its logits up to a constant per image: the same softmax at
        # any temperature, so the ECE before and after the val temperature of its sidecar
        column = {c: i for i, c in enumerate(classes)}
        ft_ece, _ = calibration_scores(np.log(np.clip(proba, 1e-12, None)),
                                       np.array([column.get(y, -1) for y in y_true]),
                                       read_meta(paths.finetuned), True)
        f.update(ft_ece)
        preds += image_predictions("finetune", test, proba, classes, "probability")
        panels.append((y_true, ft_pred, f"fine-tuned: test accuracy {f['accuracy']:.3f}"))
        calibrated = f", expected calibration error {f['ece']:.4f}" + (
            f" ({f['ece_t']:.4f} after temperature scaling)" if "ece_t" in f else "")
        print(f"evaluate: fine-tuned network: test accuracy {f['accuracy']:.4f}, macro F1 "
              f"{f['macro_f1']:.4f}{calibrated}", flush=True)
    scores = EvalMetrics.from_scores(metrics)
    scores.write(paths.eval_metrics)
    write_test_metrics(paths.test_metrics, scores)
    PerClass.from_scores(metrics).write(paths.per_class)
    Predictions(rows=tuple(preds), k=max(len(pr.top) for pr in preds)).write(paths.predictions)
    write_confusion(paths.confusion, y_true, y_pred, relpaths)
    # header only when there is no fine-tuned network: DVC needs the output to exist
    write_confusion(paths.confusion_finetune, y_true[: len(ft_pred)], ft_pred,
                    relpaths[: len(ft_pred)])
    plot_confusion(paths.confusion_png, panels, head.classes)
    coverage.write(paths.coverage)
    print(f"evaluate: test accuracy {p['accuracy']:.4f}, macro F1 {p['macro_f1']:.4f} "
          f"on {p['n']} images, {p['n'] - sum(pr.correct for pr in preds[:p['n']])} wrong "
          f"-> {paths.eval_metrics}, {paths.predictions}", flush=True)
    _say_calibration(ece, coverage)
    for relpath, why in skipped:
        print(f"evaluate: skipped unreadable {relpath}: {why}", flush=True)
    return metrics


def _say_calibration(ece: dict, coverage: Coverage) -> None:
    """The probe's calibration error before and after, and its accuracy-coverage table."""
    if ece:
        names = {"ece": "as the probe says", "ece_t": "after temperature scaling"}
        print("evaluate: expected calibration error " + ", ".join(
            f"{v:.4f} {names[k]}" for k, v in ece.items()), flush=True)
    for r in coverage.rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        print(f"evaluate: min confidence {r.min_confidence:g}: keeps {r.kept} "
              f"({r.coverage:.1%}), accuracy on them {acc}", flush=True)
