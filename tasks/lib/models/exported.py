"""The exported graphs as files and registry artifacts: where the export stage writes each
model's graph (<base.paths.exported>/<model>.onnx and its .json sidecar), the marker it writes
for a model it does not export, the GTO artifact each graph is (`probe-onnx`,
`finetuned-onnx`), and the packages the export needs.

Light on purpose (no torch, no onnx): `tlflow run` checks the packages before any stage
runs, and the stage writes its markers without importing the exporter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path, write_json

FORMAT = "tlflow.onnx/1"  # the sidecar's format
PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # dependencies (and in tlflow[zoo])
MODELS = ("probe", "finetuned")  # the models a graph is exported from
SUFFIX = "-onnx"  # GTO artifact of a model's graph: probe -> probe-onnx


def missing_packages() -> list[str]:
    """The packages the export needs that are not installed."""
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def require_onnx(who: str = "export") -> None:
    """One line when the packages are missing (exit 2), before any work."""
    missing = missing_packages()
    if missing:
        raise TlflowError(f"{who}: needs the package(s) {', '.join(missing)}, tlflow's "
                          f"dependencies, missing here: pip install {' '.join(missing)}")


def check_stage_ready(enabled: bool) -> None:
    """With export.enabled: true, the packages are installed; otherwise one line naming the
    extra and the param (TlflowError: exit 2). `tlflow run` calls it before any stage."""
    if enabled:
        require_onnx("params.yaml: export.enabled: true (the export stage)")


def graph_files(folder: Path, model: str) -> tuple[Path, Path]:
    """The (graph, sidecar) the export stage writes for `model` under base.paths.exported."""
    if model not in MODELS:
        raise TlflowError(f"export.model: unknown model {model!r}; one of {list(MODELS)}")
    return folder / f"{model}.onnx", folder / f"{model}.json"


def artifact(model: str) -> str:
    """The GTO artifact of a model's exported graph: probe -> probe-onnx."""
    return f"{model}{SUFFIX}"


def source_model(name: str) -> str | None:
    """The model an artifact name's graph is exported from (probe-onnx -> probe), or None
    when the name is not an exported graph's."""
    model = name.removesuffix(SUFFIX)
    return model if name.endswith(SUFFIX) and model in MODELS else None


def save_disabled(folder: Path, model: str, why: str) -> None:
    """The stage's outputs for a model it does not export: a one-line text in place of the
    graph (not ONNX: a runtime refuses it; not empty: DVC warns of an empty output) and a
    sidecar saying so (DVC needs every declared output; `tlflow promote` refuses this one)."""
    onnx, sidecar = graph_files(folder, model)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(onnx) as tmp:
        tmp.write_text(f"not an ONNX graph: the export stage did not export the {model} "
                       f"({why}); see {sidecar.name}\n", encoding="utf-8")
    write_json(sidecar, {"format": FORMAT, "enabled": False, "why": why})


def promotion_terms(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What the promotion rule compares, from an exported graph's sidecar: its source
    model's (val accuracy, val split, extractor id) and the graph's classes; None for a
    marker or a graph without them."""
    model = meta.get("model")
    if meta.get("enabled") is False or not isinstance(model, dict) \
            or "val_accuracy" not in model:
        return None
    return {**model, "classes": meta.get("classes")}
