"""base.paths: every path the pipeline reads or writes, said once, and checked before
anything is written (no path is the project or above it, two keys never name one file,
nothing lies inside a folder tlflow prunes)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import (
    model_validator,
)

from tlflow.tasks.lib.core.files import wrong_kind
from tlflow.tasks.lib.core.section import _Section


class Paths(_Section):
    """Every path the pipeline reads or writes, relative to the project root."""

    images: Path
    manifest: Path
    hash_cache: Path
    features: Path
    extract_report: Path
    extract_metrics: Path
    head: Path
    probe_metrics: Path
    probe_report: Path
    # train: one row per backbone of extract.compare (a default: projects from before it)
    compare_report: Path = Path("reports/compare.json")
    # train: the sweep as a DVC plot (val accuracy per C, a column per layer)
    sweep: Path = Path("plots/sweep.csv")
    eval_metrics: Path
    per_class: Path
    confusion: Path
    confusion_png: Path
    strategy: Path
    train_choice: Path
    finetuned: Path
    finetune_curve: Path
    finetune_checkpoints: Path
    predictions: Path  # evaluate: one row per (model, test image)
    # evaluate: accuracy against coverage at four min confidences (DVC plot)
    coverage: Path = Path("plots/coverage.csv")
    confusion_finetune: Path  # evaluate: the fine-tuned network's confusion CSV
    duplicates: Path  # audit: near-duplicates across splits, one image under two labels
    label_issues: Path  # audit: likely label errors on train + val
    balance: Path  # audit: images per class and split
    audit_metrics: Path  # audit: the counts
    report: Path  # the HTML report (tlflow run, tlflow report); thumbnails beside it
    # The keys below have defaults: a project made before them keeps working.
    export: Path = Path("export")  # tlflow export: <export>/<artifact>.onnx + .json (a folder)
    # the export stage (export.enabled): <exported>/<artifact>.onnx + .json, DVC outputs
    exported: Path = Path("models/exported")
    plots_page: Path = Path("report/plots.html")  # `tlflow plots`: DVC's plots as SVG, offline
    # evaluate: the test scores in short names, the DVC metric (eval_metrics is the full file)
    test_metrics: Path = Path("metrics/test.json")
    # tlflow run: the images it brought, judged against the probe that served before it
    new_images: Path = Path("report/new_images.json")

    @model_validator(mode="after")
    def _apart(self) -> Paths:
        """Checked before anything is written: no path is the project root or one of its
        ancestors, no two paths are the same, and no path lies inside a folder tlflow
        mirrors or clears (images, features, finetune_checkpoints): a wrong path must never
        make a clean-up delete the project or another output."""
        root = Path.cwd().resolve()
        files = {}  # key -> the resolved paths it writes
        for key, value in self:
            if str(value).strip() in ("", "."):
                raise ValueError(f"{key}: {str(value)!r} is the project root itself")
            resolved = (root / value).resolve()
            if resolved == root or resolved in root.parents:
                raise ValueError(f"{key}: {str(value)!r} is the project root or a folder "
                                 "above it")
            stems = (".safetensors", ".json") if key in _STEMS else ("",)
            files[key] = [resolved.with_name(resolved.name + s) for s in stems]
            _check_kind(key, value, files[key], folder=key in (*_FOLDERS, "export", "exported"))
        seen: dict[Path, str] = {}
        for key, paths in files.items():
            for f in paths:
                if f in seen:
                    raise ValueError(f"{key}: {f} is also base.paths.{seen[f]}")
                seen[f] = key
        for folder in _FOLDERS:
            (top,) = files[folder]
            for key, paths in files.items():
                inside = [f for f in paths if key != folder and top in f.parents]
                if inside:
                    raise ValueError(f"{key}: {inside[0]} lies inside base.paths.{folder} "
                                     f"({top}), which tlflow mirrors or clears")
        return self


def _check_kind(key: str, value: Path, paths: list[Path], folder: bool) -> None:
    """A file's path that is an existing folder, or a folder's that is an existing file, is
    refused before anything runs (an atomic rename onto a folder fails after the work)."""
    for f in paths:
        # a folder that cannot be searched: the stage that writes there says so in one line
        with contextlib.suppress(OSError):
            wrong = wrong_kind(f, folder)
            if wrong is None:
                continue
            if wrong[0] == "is a file":
                raise ValueError(f"{key}: {str(value)!r} is a file; it names a folder")
            if wrong[0] == "is a folder":
                raise ValueError(f"{key}: {str(value)!r} is a folder; it names a file "
                                 f"({f.name}): remove that folder or name another path")
            raise ValueError(f"{key}: {str(value)!r} lies under {wrong[1]}, which is a file")


_STEMS = ("head", "finetuned")  # a model: <stem>.safetensors and <stem>.json
_FOLDERS = ("images", "features", "finetune_checkpoints")  # folders tlflow prunes or clears
