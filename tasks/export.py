"""Export: a model as one ONNX graph, backbone and head together, plus a JSON sidecar.

Two ways in. The `export` stage (`run`, the last of `tlflow run`; off by default:
export.enabled) writes the working tree's export.model (probe or finetuned) as
<base.paths.exported>/<model>.onnx + .json, DVC outputs that GTO registers as probe-onnx or
finetuned-onnx (`tlflow promote`), and a marker for the other model (and for both when off).
`tlflow export` (`export_model`) writes the served model (the version in prod, or the working
tree's: the one predict would use, built the way predict builds it) to <out>/<artifact>.onnx,
outside DVC, for ad-hoc use (README: Export).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import check_file_path
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.models.exported import (
    MODELS,
    check_stage_ready,
    graph_files,
    require_onnx,
    save_disabled,
)
from tlflow.tasks.lib.models.registry import PROD
from tlflow.tasks.lib.models.serving import Served, load_served

if TYPE_CHECKING:  # the exporter imports torch: only when a graph is written
    from tlflow.tasks.lib.models.onnxexport import Exported

# what export reads besides base.paths: the extractor the probe's codes come from, and the
# stage's switch (the command reads none of export's keys but the format it is given)
PARAMS = ("base.seed", "extract", "export")
FORMATS = ("onnx",)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _model_meta(served: Served) -> dict[str, Any]:
    """The sidecar's `model`: which model, its version and files, and the terms the
    promotion rule compares (its val accuracy and val split: a graph's are its model's)."""
    v = served.version
    given = served.model.meta.as_json()  # the keys its sidecar holds
    terms = {k: given[k] for k in ("val_accuracy", "val_set") if k in given}
    return {"artifact": served.artifact, "version": v.version if v else None,
            "rev": v.rev if v else None, "stage": PROD if v else None,
            "source": served.source or "the working tree", "files_sha256": served.files,
            **terms}


def _probe(served: Served, params: Params) -> tuple[Any, int, str, dict[str, Any]]:
    import torch

    from tlflow.tasks.lib.features.runtime import code_precision
    from tlflow.tasks.lib.models.onnxexport import ProbeGraph, preprocess
    from tlflow.tasks.lib.models.serving import served_backbone

    head = served.model
    backbone, cfg = served_backbone(head, params, torch.device("cpu"))
    scores = "probability" if head.has_probabilities else "decision"
    served_in = code_precision(cfg, torch.device("cpu"))  # fp32 in ONNX Runtime
    meta = {
        "classes": list(head.classes), "scores": scores,
        "preprocess": preprocess(backbone, cfg.decode),
        "model": {**_model_meta(served), "extractor_id": head.meta.extractor_id,
                  "backbone": backbone.name, "weights": backbone.weights_id,
                  "layer": head.meta.layer},
        "predict_precision": served_in,
    }
    if "calibration" in head.meta.model_fields_set:  # the temperature --min-confidence uses
        meta["calibration"] = head.meta.as_json()["calibration"]
    notes = []
    if served_in != "fp32":
        notes.append(f"the head was trained on {served_in} codes and predict computes "
                     f"{served_in} codes for new images; this graph computes fp32: its scores "
                     "differ from predict's by the rounding of the codes")
    if cfg.dtype != "float32":
        notes.append(f"for images already in the feature store predict reads their codes as "
                     f"stored ({cfg.dtype}): its scores for those differ from this graph's by "
                     "that rounding")
    if notes:
        meta["note"] = "; ".join(notes) + " (README: Export)"
    if scores == "decision":
        meta["note_scores"] = ("a linear SVM has no probabilities: the output is its decision "
                               "values, as `tlflow predict` prints them")
    return ProbeGraph(backbone, head), backbone.input_size, scores, meta


def _finetuned(served: Served) -> tuple[Any, int, str, dict[str, Any]]:
    from tlflow.tasks.lib.models.onnxexport import SoftmaxGraph, preprocess

    net = served.model
    meta = {
        "classes": list(net.classes), "scores": "probability",
        "preprocess": preprocess(net.backbone, "full"),
        "model": {**_model_meta(served), "backbone": net.backbone.name},
        "predict_precision": "fp32",
    }
    if net.meta.calibration:  # the temperature predict's --min-confidence divides by
        meta["calibration"] = net.meta.as_json()["calibration"]
    return SoftmaxGraph(net.model), net.backbone.input_size, "probability", meta


def graph(served: Served, params: Params) -> tuple[Any, int, str, dict[str, Any]]:
    """The torch module to export (fp32, CPU), its input size, what its scores are
    (probability or decision) and the sidecar's description of it."""
    return _finetuned(served) if served.artifact == "finetuned" else _probe(served, params)


def check_ready(fmt: str = "onnx") -> None:
    """Before any work: the format is known and its packages are installed
    (TlflowError, one line, otherwise)."""
    if fmt not in FORMATS:
        raise TlflowError(f"--format: unknown format {fmt!r}; one of {list(FORMATS)}")
    require_onnx()


def _write(served: Served, params: Params, dest: Path) -> Exported:
    """Export the served model to dest (.onnx) and its sidecar; the summary on stderr."""
    from tlflow.tasks.lib.models.onnxexport import export

    module, size, scores, meta = graph(served, params)
    done = export(module, size, "probabilities" if scores == "probability" else "decision",
                  dest, meta)
    who = served.source or f"the working tree's {served.artifact}"
    _note(f"export: {who} -> {done.onnx} ({done.size / 1e6:.1f} MB, {done.seconds:.1f} s), sidecar "
          f"{done.sidecar}; ONNX Runtime vs torch on the check batch: max |diff| "
          f"{done.max_diff:.1e}")
    if "note" in meta:
        _note(f"export: {meta['note']}")
    return done


def export_model(params: Params, model: str = "promoted", fmt: str = "onnx",
                 out: Path | None = None) -> Exported:
    """`tlflow export`: write <out>/<artifact>.onnx and its .json sidecar (out:
    base.paths.export by default); the graph's path on stdout, a summary line on stderr.
    Raises TlflowError (one line) before any work for an unknown format, a missing optional
    package, an --out that is a file, or a model that does not exist."""
    check_ready(fmt)
    out = params.base.paths.export if out is None else out
    served = load_served(params, model)
    if served is None:
        _note(f"export: no model is assigned to {PROD} (`tlflow promote`); exporting the "
              "working tree's probe")
        served = load_served(params, "probe")
    dest = out / f"{served.artifact}.onnx"
    check_file_path(dest, "--out")
    done = _write(served, params, dest)
    print(done.onnx)
    return done


def run(params: Params) -> Exported | None:
    """The export stage. export.enabled: the working tree's export.model as
    <base.paths.exported>/<model>.onnx + .json, and markers for the other model; off: markers
    for both (an empty .onnx, a sidecar with enabled: false), nothing imported. Raises
    TlflowError (one line) before anything is written when the ONNX packages are missing
    (naming the param and the extra) or the model does not exist (e.g. export.model:
    finetuned with fine-tuning off)."""
    cfg, folder = params.export, params.base.paths.exported
    if not cfg.enabled:
        for model in MODELS:
            save_disabled(folder, model, "export.enabled: false")
        print("export: off (export.enabled: false); wrote its markers only")
        return None
    check_stage_ready(True)
    check_ready(cfg.format)
    served = load_served(params, cfg.model)  # one line when its files are missing
    dest, _ = graph_files(folder, cfg.model)
    check_file_path(dest, "base.paths.exported")
    done = _write(served, params, dest)
    for model in MODELS:
        if model != cfg.model:
            save_disabled(folder, model, f"export.model: {cfg.model}")
    print(f"export: {done.onnx} and {done.sidecar} (DVC outputs; `tlflow promote --model "
          f"{cfg.model}-onnx` registers them)")
    return done
