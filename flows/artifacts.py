"""What a pipeline run publishes (Prefect artifacts): a markdown summary, a per-class table,
the confusion matrix as an image, the advice with whether it was carried out, and the
misclassified test images as a table; and the offline HTML report (flows/html_report.py).

The summary compares the run with what the previous one left on disk: the manifest (data
version, images added and removed) and metrics/eval.json. Nothing is kept besides the
project's own files, so there is no second ledger to drift. Each artifact's description
carries the headline (e.g. "probe 0.9481 (+0.0070), finetune 0.9540"), so the timeline of an
artifact key in Prefect's UI reads as a history of accuracy.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlflow.flows.history import current_data_version
from tlflow.tasks.lib.core.handoff.evaluate import ClassScores, EvalMetrics, PerClass, Scores
from tlflow.tasks.lib.core.handoff.extract import ExtractReport
from tlflow.tasks.lib.core.handoff.train import Strategy
from tlflow.tasks.lib.core.paths import Paths
from tlflow.tasks.lib.data.manifest import read_manifest

MODELS = ("probe", "finetune")
# The confusion matrix is embedded in its markdown artifact as a data URI up to this size
# (the default project's 10 classes: 40 KB; 100 classes: 1.4 MB); larger, the artifact names
# the file. Prefect keeps artifacts in its database, so they should stay small.
MAX_EMBEDDED_PNG = 1 << 20
# plans that fine-tune the network
FINETUNE_PLANS = ("finetune_top", "finetune_all")


@dataclass(frozen=True)
class Snapshot:
    """The data version and the metrics the project holds at one moment."""

    data_version: str | None
    images: frozenset[str] = field(default_factory=frozenset)
    metrics: dict[str, Scores] = field(default_factory=dict)  # by model (EvalMetrics.models)

    @classmethod
    def take(cls, paths: Paths) -> Snapshot:
        if not paths.manifest.is_file():
            return cls(None)
        images = frozenset(r.sha256 for r in read_manifest(paths.manifest))
        metrics = EvalMetrics.read(paths.eval_metrics).models() \
            if paths.eval_metrics.is_file() else {}
        return cls(current_data_version(paths), images, metrics)


def _delta(now: float, before: float | None) -> str:
    return f"{now:.4f}" if before is None else f"{now:.4f} ({now - before:+.4f})"


def _data(snap: Snapshot) -> str:
    """The data version as the summary names it; never "None"."""
    return snap.data_version or "not versioned yet (ingest has not been recorded)"


def summary_markdown(project: str, paths: Paths, before: Snapshot, after: Snapshot,
                     results: list, failed: str | None = None) -> str:
    """The run's summary: data version, how many new images look unlike the training set,
    stages (ran or skipped, and why), metrics."""
    added, removed = len(after.images - before.images), len(before.images - after.images)
    lines = [f"# {project}: tlflow run", ""]
    if failed:
        lines += [f"**Failed** at {failed}. The outputs of earlier runs stay in place.", ""]
    version = f"manifest `{after.data_version}`" if after.data_version else _data(after)
    lines += [f"- data version: {version}, {len(after.images)} images "
              f"({added} added, {removed} removed since the previous run)"]
    if paths.extract_report.is_file():  # which input size extract.image_size resolved to
        report = ExtractReport.read(paths.extract_report)
        if report.image_size:
            lines.append(f"- input size: {report.image_size} px ({report.image_size_why})")
    if paths.new_images.is_file():  # what the probe before this run made of its new images
        from tlflow.flows.drift import line, this_run

        if (judged := this_run(paths)) is not None:
            lines.append(f"- {line(judged)}")
    lines += ["",
              "| stage | ran | why | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {'ran' if r.ran else 'skipped'} | {r.reason} | {r.seconds:.1f} |"
              for r in results]
    lines.append("")
    lines += audit_lines(paths)
    for model in ("probe", "finetune"):
        now = after.metrics.get(model)
        if not now:
            continue
        was = before.metrics.get(model)
        lines.append(f"- {model}: test accuracy {_delta(now.accuracy, was and was.accuracy)}"
                     f", macro F1 {_delta(now.macro_f1, was and was.macro_f1)}"
                     + ("" if was else " (no previous run)"))
    return "\n".join(lines)


def audit_lines(paths: Paths) -> list[str]:
    """The counts behind the report: test images each model gets wrong, near-duplicates
    across splits, files under two labels, likely label errors (each when written)."""
    from tlflow.tasks.lib.core.handoff.audit import Duplicates, LabelIssues
    from tlflow.tasks.lib.core.handoff.evaluate import Predictions

    lines = []
    if paths.predictions.is_file():
        preds = Predictions.read(paths.predictions).rows
        for model in MODELS:
            mine = [p for p in preds if p.model == model]
            if mine:
                lines.append(f"- {model}: {sum(not p.correct for p in mine)} of {len(mine)} "
                             "test images wrong")
    if paths.duplicates.is_file() and paths.label_issues.is_file():
        dups = Duplicates.read(paths.duplicates)
        issues = LabelIssues.read(paths.label_issues)
        lines.append(f"- audit: {dups.near_duplicates.count} near-duplicate pair(s) "
                     f"across splits, {dups.label_conflicts.count} file(s) under two "
                     f"labels, {issues.count} likely label error(s)")
    if paths.report.is_file():
        lines.append(f"- report: `{paths.report}` (offline HTML: the gallery of errors, the "
                     "pairs, the suspected labels)")
    return [*lines, ""] if lines else []


def misclassified_rows(paths: Paths) -> list[dict[str, Any]]:
    """The test images a model gets wrong, hardest (highest loss) first: the table artifact."""
    from tlflow.tasks.lib.core.handoff.evaluate import Predictions

    if not paths.predictions.is_file():
        return []
    wrong = sorted((p for p in Predictions.read(paths.predictions).rows if not p.correct),
                   key=lambda p: (p.model, -p.loss, p.relpath))
    return [{"model": p.model, "relpath": p.relpath, "label": p.label,
             "predicted": p.top[0] if p.top else "",
             "top": ", ".join(f"{t} {s:.3f}" for t, s in zip(p.top, p.scores, strict=True)),
             "loss": round(p.loss, 4)} for p in wrong]


def headline(before: Snapshot, after: Snapshot) -> str:
    """The test accuracies and their change, e.g. "probe 0.9481 (+0.0070), finetune 0.9540"."""
    parts = []
    for model in MODELS:
        now, was = after.metrics.get(model), before.metrics.get(model)
        if now is None:
            continue
        parts.append(f"{model} {now.accuracy:.4f}"
                     + ("" if was is None else f" ({now.accuracy - was.accuracy:+.4f})"))
    return ", ".join(parts) or "no test metrics"


def per_class_rows(rows: tuple[ClassScores, ...]) -> list[dict[str, Any]]:
    """The per-class table as Prefect table rows (model, class, precision, recall, f1,
    support), rounded."""
    return [{"model": r.model, "class": r.label, "precision": round(r.precision, 4),
             "recall": round(r.recall, 4), "f1": round(r.f1, 4), "support": r.support}
            for r in rows]


def confusion_markdown(png: Path, title: str) -> str:
    """The confusion matrix PNG embedded as a data URI (Prefect's image artifact takes a URL,
    which a PNG on this machine has not); a pointer to the file when it is too large."""
    size = png.stat().st_size
    if size > MAX_EMBEDDED_PNG:
        return (f"# {title}\n\n`{png}` ({size / 2**20:.1f} MiB) is too large to embed; see "
                "it with `dvc plots show`")
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"# {title}\n\n![confusion matrix of the probe on the test split]" \
           f"(data:image/png;base64,{data})"


def advice_markdown(decision: Strategy, finetuned: bool) -> tuple[str, str]:
    """The advice as markdown, with whether train and finetune carried out the plan and
    whether fine-tuning ran against it; and the one-line description."""
    from tlflow.tasks.lib.probe.strategy import table

    plan = decision.plan
    if decision.carried_out:
        done = "carried out (advise.strategy selects the plan)"
    else:
        done = ("not carried out: advise.strategy is manual, so train and finetune followed "
                "their own sections (set advise.strategy: auto to carry it out)")
    notes = [f"- plan {done}"]
    if finetuned and plan not in FINETUNE_PLANS:
        notes.append(f"- fine-tuning ran **against the advice** (plan {plan} does not "
                     "fine-tune)")
    elif not finetuned and plan in FINETUNE_PLANS:
        notes.append(f"- the plan fine-tunes ({plan}), but fine-tuning did not run")
    description = (f"plan {plan} ({decision.size}, {decision.similarity}): "
                   f"{'carried out' if decision.carried_out else 'not carried out'}"
                   + ("; fine-tuned against the advice" if finetuned and plan not in
                      FINETUNE_PLANS else ""))
    return "# Strategy\n\n" + table(decision) + "\n" + "\n".join(notes), description


def compare_table(paths: Paths) -> tuple[list[str], list[list[str]]] | None:
    """The comparison of backbones as (header, rows of cells), the winner marked; None when
    none ran (reports/compare.json from train)."""
    from tlflow.tasks.lib.assess.compare import table
    from tlflow.tasks.lib.core.handoff.train import CompareReport

    if not paths.compare_report.is_file():
        return None
    rep = CompareReport.read(paths.compare_report)
    return table(rep) if rep.compared else None


def compare_rows(paths: Paths) -> list[dict[str, str]]:
    """compare_table as Prefect table rows (column title -> cell); [] when none ran."""
    found = compare_table(paths)
    return [dict(zip(found[0], row, strict=True)) for row in found[1]] if found else []


def artifact_key(project: str, what: str) -> str:
    """An artifact's key: the project first, e.g. "my-flowers-run-summary" (Prefect's keys are
    lowercase letters, digits and dashes; base.project is one such name)."""
    return f"{project}-{what}"


def publish_summary(project: str, paths: Paths, before: Snapshot, results: list,
                    failed: str | None = None) -> None:
    """Create the run's artifacts, each keyed by the project (`artifact_key`): summary,
    per-class table, confusion matrix, misclassified images, the backbones compared, advice."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    after = Snapshot.take(paths)
    head = headline(before, after)
    status = f"failed at {failed.split(':', 1)[0]}; " if failed else ""
    markdown = summary_markdown(project, paths, before, after, results, failed)
    create_markdown_artifact(markdown=markdown, key=artifact_key(project, "run-summary"),
                             description=f"{status}{head}; data {_data(after)}")
    if failed:
        return
    rows = per_class_rows(PerClass.read(paths.per_class).rows) if paths.per_class.is_file() \
        else []
    if rows:
        create_table_artifact(table=rows, key=artifact_key(project, "per-class"),
                              description=f"Per-class test metrics: {head}")
    if paths.confusion_png.is_file() and "probe" in after.metrics:
        title = f"probe: test accuracy {after.metrics['probe'].accuracy:.4f}"
        create_markdown_artifact(markdown=confusion_markdown(paths.confusion_png, title),
                                 key=artifact_key(project, "confusion"),
                                 description=f"Confusion matrix (test split): {head}")
    wrong = misclassified_rows(paths)
    if wrong:
        create_table_artifact(table=wrong, key=artifact_key(project, "misclassified"),
                              description=f"Misclassified test images, hardest first: {head}")
    compared = compare_rows(paths)
    if compared:
        create_table_artifact(table=compared, key=artifact_key(project, "compare"),
                              description="Backbones compared on the same images (extract."
                                          "compare); * serves: the best on val, ties within "
                                          "one standard error to the cheaper")
    if paths.strategy.is_file():
        markdown, description = advice_markdown(Strategy.read(paths.strategy),
                                                "finetune" in after.metrics)
        create_markdown_artifact(markdown=markdown, key=artifact_key(project, "strategy"),
                                 description=description)
