"""Predict: labels for new images with the model in prod (GTO), or the working tree's probe
(codes in the store are reused) or fine-tuned network.

Read-only: it never writes to the feature store (a DVC output). Codes come from the backbone
the head names (extract.compare's winner) and, where they must be computed, it refuses to run
when params describe another extractor (layers, storage dtype) than the head was trained on.
The promoted model's files are read at its commit through dvc.api (safetensors and JSON only).

The predictions are data: CSV on stdout (the same rows `--out` writes). Everything else (the
summary line, notes, the progress of computing codes, the images skipped) goes to stderr.
Unreadable images are skipped and listed, as extract skips them; `strict` fails on the first.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path, check_file_path, sha256_file
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.data.decode import read_image
from tlflow.tasks.lib.data.imagefiles import image_files
from tlflow.tasks.lib.models.registry import PROD
from tlflow.tasks.lib.models.serving import load_served
from tlflow.tasks.lib.probe.head import LinearHead, ModelMeta

# what predict reads besides base.paths: the extractor (to compute codes the store lacks)
# and where the fine-tuned network runs
PARAMS = ("base.seed", "extract", "finetune.device", "finetune.batch_size",
          "predict.min_confidence")


@dataclass(frozen=True)
class Prediction:
    """Top-k labels of one image with their probabilities (the model's own), and what
    tasks/lib/probe/trust.py makes of them: the decision (the top label, or `unsure` below the min
    confidence), the calibrated top probability and whether the image is novel (None: no
    check)."""

    path: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]
    prediction: str = ""
    confidence: float | None = None
    novel: bool | None = None


def top_k(scores: np.ndarray, classes: tuple[str, ...], k: int) -> list[tuple[tuple, tuple]]:
    """(labels, scores) of the k best classes per row."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    names = np.asarray(classes)
    return [(tuple(names[o]), tuple(float(p) for p in scores[i, o]))
            for i, o in enumerate(order)]


def head_scores(head: LinearHead, codes: np.ndarray) -> np.ndarray:
    """Probabilities; for a linear SVM, its decision values."""
    return head.predict_proba(codes) if head.has_probabilities else head.logits(codes)


@dataclass(frozen=True)
class Codes:
    """The codes of the readable files, which files they are, and what was skipped."""

    codes: np.ndarray | None  # (len(kept), D); None when nothing was readable
    kept: list[int]  # indices into the files asked about
    computed: int  # how many codes took a forward pass (the rest came from the store)
    skipped: list[str]  # one line per unreadable file, naming it and why


def codes_for(files: list[Path], head: LinearHead, params: Params,
              strict: bool = False) -> Codes:
    """Codes of the head's layer: from the store of the head's own extractor where it holds
    them (content-addressed: the same image bytes, the same codes), else one forward pass each
    with the backbone the head names (unreadable files skipped, or an error with
    `strict`)."""
    from tlflow.tasks.lib.features.store import FeatureStore, store_path

    keys = [sha256_file(f) for f in files]
    layer = head.meta.layer
    path = store_path(params.base.paths.features, head.meta.extractor_id)
    stored: dict[str, np.ndarray] = {}
    if path.is_file():  # the store of the head's own extractor: its codes are reused
        with FeatureStore(path) as store:
            have = set(store.keys())
            cached = [k for k in keys if k in have]
            if cached and layer in store.layers:
                stored = dict(zip(cached, store.read(layer, cached), strict=True))
    todo = [i for i, k in enumerate(keys) if k not in stored]
    fresh, skipped = {}, []
    if todo:
        computed, skipped = _compute([files[i] for i in todo], layer, head, params, strict)
        fresh = {todo[j]: code for j, code in computed.items()}
    kept = [i for i, k in enumerate(keys) if k in stored or i in fresh]
    codes = np.stack([stored[keys[i]] if keys[i] in stored else fresh[i] for i in kept]) \
        if kept else None
    return Codes(codes, kept, len(fresh), skipped)


def _compute(files: list[Path], layer: str, head: LinearHead, params: Params,
             strict: bool) -> tuple[dict[int, np.ndarray], list[str]]:
    """Forward passes with the extractor the head was trained on (checked by its id), through
    extract's loader: {index: code} of the readable files, and the unreadable ones."""

    from tlflow.tasks.lib.core.device import resolve_device
    from tlflow.tasks.lib.core.progress import Progress
    from tlflow.tasks.lib.features.codes import CodeExtractor
    from tlflow.tasks.lib.features.extraction import close, encode, make_loader
    from tlflow.tasks.lib.features.runtime import code_model
    from tlflow.tasks.lib.models.serving import served_backbone

    backbone, cfg = served_backbone(head, params, resolve_device(params.extract.device))
    device = resolve_device(cfg.device)  # the CPU for a head on ONNX Runtime's codes
    codes, skipped = {}, []
    batches = make_loader(files, backbone, cfg, device)  # sets the threads the model takes
    # every layer extract computes: the same graph as extract's, already in the cache
    model = code_model(CodeExtractor(backbone, cfg.layers), backbone.input_size, cfg, device)
    progress = Progress("predict: computing codes", len(files))
    try:
        for batch in batches:
            for _, err in batch.errors:
                if strict:
                    raise TlflowError(f"{err} (--strict)")
                print(f"predict: skipped {err}", file=sys.stderr, flush=True)
                skipped.append(err)
            if batch.images is not None:
                out = encode(model, batch.images, device, cfg.precision)[layer]
                codes.update(zip(batch.indices, out, strict=True))
            progress.advance(len(batch.indices) + len(batch.errors))
    finally:
        close(batches)
        progress.close()
    return codes, skipped


def readable(files: list[Path], strict: bool = False) -> tuple[list[int], list[str]]:
    """Which files decode (indices), and a line per one that does not (or an error)."""
    kept, skipped = [], []
    for i, f in enumerate(files):
        try:
            read_image(f, lambda img: None)
            kept.append(i)
        except TlflowError as err:
            if strict:
                raise TlflowError(f"{err} (--strict)") from None
            print(f"predict: skipped {err}", file=sys.stderr, flush=True)
            skipped.append(str(err))
    return kept, skipped


TRUST_COLUMNS = ("prediction", "confidence", "novel")


def write_csv(f: IO[str], preds: list[Prediction], score: str) -> None:
    """CSV: path, then label_i and probability_i (or decision_i) for each of the top k (the
    model's own), then prediction (label_1, or `unsure`), confidence (the calibrated top
    probability; empty without one) and novel (true / false; empty without a check)."""
    k = len(preds[0].labels)
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["path", *[c for i in range(1, k + 1) for c in (f"label_{i}", f"{score}_{i}")],
                *TRUST_COLUMNS])
    for p in preds:
        w.writerow([p.path, *[v for pair in zip(p.labels, p.scores, strict=True)
                              for v in (pair[0], f"{pair[1]:.6f}")],
                    p.prediction or p.labels[0],
                    "" if p.confidence is None else f"{p.confidence:.6f}",
                    "" if p.novel is None else str(p.novel).lower()])


def write_predictions(dest: Path, preds: list[Prediction], score: str) -> None:
    """The predictions' CSV as a file, written atomically."""
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        write_csv(f, preds, score)


def _check_k(k: int, n_classes: int) -> None:
    if not 1 <= k <= n_classes:
        raise TlflowError(f"--top-k: must be between 1 and {n_classes}, got {k}")


def assess(scores: np.ndarray, kind: str, meta: ModelMeta, min_confidence: float | None,
           head: LinearHead | None, codes: np.ndarray | None):
    """tasks/lib/probe/trust.py's assessment of these scores (probabilities or decision values)."""
    from tlflow.tasks.lib.probe import trust

    return trust.assess(trust.logits_for(scores, kind), meta, kind == "probability",
                        min_confidence, head, codes)


def trust_notes(seen, min_confidence: float | None, finetuned: bool = False) -> list[str]:
    """The stderr lines on the images labelled unsure and the novel ones."""
    from tlflow.tasks.lib.probe.novelty import summary

    lines = []
    if seen.confidence is None:
        lines.append("no confidence: decision values and no calibration recorded"
                     + (" (--min-confidence ignored)" if min_confidence is not None else ""))
    elif not seen.calibrated:
        lines.append("the model records no calibration: confidence is its own top "
                     "probability")
    if min_confidence is not None and seen.confidence is not None:
        lines.append(f"{int(seen.unsure.sum())} of {len(seen.unsure)} images unsure "
                     f"(calibrated confidence below {min_confidence:g})")
    if seen.novel is not None:
        lines.append(summary(seen.novel))
    else:
        lines.append("no novelty check: " + (
            "the fine-tuned network keeps no training codes (the probe does: --model probe)"
            if finetuned else "the head keeps no training codes (rerun `tlflow stage train`)"))
    return lines


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(params: Params, target: Path, k: int = 1, out: Path | None = None,
        model: str = "promoted", strict: bool = False,
        min_confidence: float | None = None) -> list[Prediction]:
    """Predict every readable image of `target`: CSV rows on stdout (and in `out` when asked),
    a summary line on stderr, and lines on the unsure and novel images. `min_confidence`
    None: predict.min_confidence. Raises TlflowError before any work when `out` is a folder
    or min_confidence is outside (0, 1]."""
    if out is not None:
        check_file_path(out, "--out")
    if min_confidence is None:
        min_confidence = params.predict.min_confidence
    elif not 0 < min_confidence <= 1:
        raise TlflowError(f"--min-confidence: must be in (0, 1], got {min_confidence:g}")
    files = image_files(target)
    served = load_served(params, model)
    if served is None:
        _note(f"predict: no model is assigned to {PROD} (`tlflow promote`); using the "
              "working tree's probe")
        served = load_served(params, "probe")
    source = served.source
    if served.artifact == "finetuned":
        from tlflow.tasks.lib.finetune.loop import finetuned_probabilities

        net = served.model
        _check_k(k, len(net.classes))  # before any forward pass
        kept, skipped = readable(files, strict)
        scores = finetuned_probabilities(net, [files[i] for i in kept], read_image,
                                         params.finetune.device, params.finetune.batch_size) \
            if kept else None
        classes = net.classes
        kind, note = "probability", f"predict: {len(kept)} images, fine-tuned network"
        meta, head, codes = net.meta, None, None  # its temperature; no novelty reference
    else:
        head = served.model
        _check_k(k, len(head.classes))  # before any forward pass
        found = codes_for(files, head, params, strict)
        kept, skipped = found.kept, found.skipped
        scores = head_scores(head, found.codes) if kept else None
        classes = head.classes
        kind = "probability" if head.has_probabilities else "decision"
        note = (f"predict: {len(kept)} images, {len(kept) - found.computed} codes from the "
                f"store, {found.computed} computed")
        meta, codes = head.meta, found.codes
    if not kept:
        raise TlflowError(f"{target}: no readable image ({len(skipped)} skipped)")
    seen = assess(scores, kind, meta, min_confidence, head, codes)
    preds = [Prediction(str(files[i]), labels, values, "unsure" if seen.unsure[j] else labels[0],
                        None if seen.confidence is None else float(seen.confidence[j]),
                        None if seen.novel is None else bool(seen.novel[j]))
             for j, (i, (labels, values)) in enumerate(zip(kept, top_k(scores, classes, k),
                                                           strict=True))]
    write_csv(sys.stdout, preds, kind)
    sys.stdout.flush()
    if skipped:
        note += f", {len(skipped)} unreadable skipped (--strict to fail)"
    _note(note + (f" ({source})" if source else ""))
    if kind == "decision":
        _note("predict: the scores are the linear SVM's decision values, not probabilities")
    for line in trust_notes(seen, min_confidence, served.artifact == "finetuned"):
        _note(f"predict: {line}")
    if out is not None:
        write_predictions(out, preds, kind)
    return preds
