"""Predict: labels for new images with the model in prod (GTO), or the working tree's probe
(codes in the store are reused) or fine-tuned network.

Read-only: it never writes to the feature store (a DVC output), and it refuses to run when the
current store or params describe another extractor than the one the head was trained on. The
promoted model's files are read at its commit through dvc.api (safetensors and JSON only).
"""

from __future__ import annotations

import csv
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.lib.errors import TlflowError
from tasks.lib.files import atomic_path, sha256_file
from tasks.lib.head import LinearHead, load_head, tensors_path
from tasks.lib.images import image_files
from tasks.lib.params import Params
from tasks.lib.registry import PROD, Version, fetch_model, promoted

# what predict reads besides base.paths: the extractor (to compute codes the store lacks)
# and where the fine-tuned network runs
PARAMS = ("base.seed", "extract", "finetune.device", "finetune.batch_size")


@dataclass(frozen=True)
class Prediction:
    """Top-k labels of one image with their probabilities."""

    path: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]


def top_k(scores: np.ndarray, classes: tuple[str, ...], k: int) -> list[tuple[tuple, tuple]]:
    """(labels, scores) of the k best classes per row."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    names = np.asarray(classes)
    return [(tuple(names[o]), tuple(float(p) for p in scores[i, o]))
            for i, o in enumerate(order)]


def head_scores(head: LinearHead, codes: np.ndarray) -> np.ndarray:
    """Probabilities; for a linear SVM, its decision values."""
    return head.predict_proba(codes) if head.has_probabilities else head.logits(codes)


def codes_for(files: list[Path], head: LinearHead, params: Params,
              source: str | None = None) -> tuple[np.ndarray, int]:
    """Codes of the head's layer: from the store where present, else one forward pass each.
    The current store must hold the head's extractor's codes (`source` names the head).

    Returns the codes and how many images had to be computed.
    """
    from tasks.lib.featurestore import FeatureStore
    from tasks.lib.handoff import current_store

    keys = [sha256_file(f) for f in files]
    layer = head.meta["layer"]
    path = current_store(params.base.paths.features)
    if path.stem != head.meta.get("extractor_id"):
        raise TlflowError(
            f"{source or tensors_path(params.base.paths.head)}: trained on codes of extractor "
            f"{head.meta.get('extractor_id')}, the current store is {path}; rerun `tlflow run` "
            "(and `tlflow promote`), or pick --model probe"
        )
    with FeatureStore(path) as store:
        have = set(store.keys())
        cached = [k for k in keys if k in have]
        stored = dict(zip(cached, store.read(layer, cached), strict=True)) if cached else {}
    todo = [i for i, k in enumerate(keys) if k not in stored]
    computed = _compute([files[i] for i in todo], layer, head, params) if todo else []
    fresh = dict(zip(todo, computed, strict=True))
    return np.stack([stored[k] if k in stored else fresh[i] for i, k in enumerate(keys)]), len(todo)


def _compute(files: list[Path], layer: str, head: LinearHead, params: Params) -> list:
    """Forward passes with the extractor the head was trained on (checked by its id)."""
    from tasks.lib.backbones import create_backbone
    from tasks.lib.device import resolve_device
    from tasks.lib.extraction import compute_codes, describe_extractor
    from tasks.lib.featurestore import extractor_id

    cfg = params.extract
    device = resolve_device(cfg.device)
    backbone = create_backbone(cfg.backbone, cfg.weights, cfg.image_size, params.base.seed)
    ext_id = extractor_id(describe_extractor(backbone.identity(), cfg, device))
    if ext_id != head.meta["extractor_id"]:
        raise TlflowError(
            f"params.yaml: extract describes extractor {ext_id} on {device}, the head was "
            f"trained on {head.meta['extractor_id']}; run `tlflow run` first"
        )
    return compute_codes(files, backbone, layer, cfg, device)


def write_predictions(dest: Path, preds: list[Prediction], score: str) -> None:
    """CSV: path, then label_i and probability_i (or decision_i) for each of the top k."""
    k = len(preds[0].labels)
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", *[c for i in range(1, k + 1) for c in (f"label_{i}",
                                                                    f"{score}_{i}")]])
        for p in preds:
            w.writerow([p.path, *[v for pair in zip(p.labels, p.scores, strict=True)
                                  for v in (pair[0], f"{pair[1]:.6f}")]])


def _check_k(k: int, n_classes: int) -> None:
    if not 1 <= k <= n_classes:
        raise TlflowError(f"--top-k: must be between 1 and {n_classes}, got {k}")


def load_promoted(params: Params, root: Path = Path()) -> tuple[Version, Any] | None:
    """The model in prod, loaded from its files at its commit (a LinearHead or a Network);
    None when no version is assigned to prod (or there is no git repo)."""
    version = promoted(root, PROD)
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        stem = fetch_model(root, params.base.paths, version, Path(tmp))
        if version.artifact == "finetuned":
            from tasks.lib.network import load_network

            return version, load_network(stem)
        return version, load_head(stem)


def run(params: Params, target: Path, k: int = 1, out: Path | None = None,
        model: str = "promoted") -> list[Prediction]:
    """Predict every image of `target`; print one line each; write a CSV when asked."""
    files = image_files(target)
    served, source = None, None
    if model == "promoted":
        served = load_promoted(params)
        if served is None:
            print(f"predict: no model is assigned to {PROD} (`tlflow promote`); using the working "
                  "tree's probe", file=sys.stderr, flush=True)
        source = f"{served[0].label()} in {PROD}" if served else None
        model = served[0].artifact if served else "probe"
    if model == "finetuned":
        from tasks.lib.finetuning import finetuned_probabilities
        from tasks.lib.network import load_network

        net = served[1] if served else load_network(params.base.paths.finetuned)
        _check_k(k, len(net.classes))  # before any forward pass
        scores = finetuned_probabilities(net, files, params.finetune.device,
                                         params.finetune.batch_size)
        classes = net.classes
        kind, note = "probability", f"predict: {len(files)} images, fine-tuned network"
    else:
        head = served[1] if served else load_head(params.base.paths.head)
        _check_k(k, len(head.classes))  # before any forward pass
        codes, n_computed = codes_for(files, head, params, source)
        scores, classes = head_scores(head, codes), head.classes
        kind = "probability" if head.has_probabilities else "decision"
        note = (f"predict: {len(files)} images, {len(files) - n_computed} codes from the "
                f"store, {n_computed} computed")
    preds = [Prediction(str(f), labels, values)
             for f, (labels, values) in zip(files, top_k(scores, classes, k), strict=True)]
    for p in preds:
        print(p.path, "  ".join(f"{lab} {v:.3f}" for lab, v in zip(p.labels, p.scores,
                                                                     strict=True)))
    print(note + (f" ({source})" if source else ""), flush=True)
    if kind == "decision":
        print("predict: the scores are the linear SVM's decision values, not probabilities")
    if out is not None:
        write_predictions(out, preds, kind)
    return preds
