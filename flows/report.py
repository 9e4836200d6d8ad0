"""What a pipeline run publishes: a markdown summary and a per-class table (Prefect artifacts).

The summary compares the run with what the previous one left on disk: the manifest (data
version, images added and removed) and metrics/eval.json. Nothing is kept besides the
project's own files, so there is no second ledger to drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.lib.files import sha256_file
from tasks.lib.handoff import read_eval_metrics
from tasks.lib.manifest import read_manifest
from tasks.lib.params import Paths


@dataclass(frozen=True)
class Snapshot:
    """The data version and the metrics the project holds at one moment."""

    manifest_sha: str | None
    images: frozenset[str] = field(default_factory=frozenset)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def take(cls, paths: Paths) -> Snapshot:
        if not paths.manifest.is_file():
            return cls(None)
        images = frozenset(r.sha256 for r in read_manifest(paths.manifest))
        metrics = read_eval_metrics(paths.eval_metrics) if paths.eval_metrics.is_file() else {}
        return cls(sha256_file(paths.manifest)[:12], images, metrics)


def _delta(now: float, before: float | None) -> str:
    return f"{now:.4f}" if before is None else f"{now:.4f} ({now - before:+.4f})"


def summary_markdown(paths: Paths, before: Snapshot, after: Snapshot, results: list,
                     failed: str | None = None) -> str:
    """The run's summary: data version, stages (ran or skipped, and why), metrics."""
    added, removed = len(after.images - before.images), len(before.images - after.images)
    lines = ["# tlflow run", ""]
    if failed:
        lines += [f"**Failed** at {failed}. The outputs of earlier runs stay in place.", ""]
    lines += [f"- data version: manifest `{after.manifest_sha}`, {len(after.images)} images "
              f"({added} added, {removed} removed since the previous run)", "",
              "| stage | ran | why | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {'ran' if r.ran else 'skipped'} | {r.reason} | {r.seconds:.1f} |"
              for r in results]
    lines.append("")
    for model in ("probe", "finetune"):
        now = after.metrics.get(model)
        if not now:
            continue
        was = before.metrics.get(model) or {}
        lines.append(f"- {model}: test accuracy {_delta(now['accuracy'], was.get('accuracy'))}"
                     f", macro F1 {_delta(now['macro_f1'], was.get('macro_f1'))}"
                     + ("" if was else " (no previous run)"))
    return "\n".join(lines)


def per_class_rows(metrics: dict) -> list[dict]:
    """One row per (model, class): precision, recall, F1, support."""
    return [{"model": model, "class": c, **{k: round(v, 4) for k, v in m.items()}}
            for model in ("probe", "finetune") if model in metrics
            for c, m in metrics[model]["per_class"].items()]


def publish_summary(paths: Paths, before: Snapshot, results: list,
                    failed: str | None = None) -> None:
    """Create the run's markdown summary and per-class table artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    after = Snapshot.take(paths)
    create_markdown_artifact(markdown=summary_markdown(paths, before, after, results, failed),
                             key="tlflow-run-summary",
                             description="Data version, stages run or skipped, metrics")
    rows = per_class_rows(after.metrics)
    if rows:
        create_table_artifact(table=rows, key="tlflow-per-class",
                              description="Per-class test metrics")
