"""The offline HTML report: one self-contained page (base.paths.report) with its thumbnails
beside it (report/thumbs/<sha256>.jpg), written by every `tlflow run` and by `tlflow report`.

It reads only what the stages wrote (metrics, per-class table, per-image predictions, the
fine-tuning curve, the advice, the audit's summaries, and the last run's new images as
flows/drift.py recorded them) and the ingest snapshot's images for
the thumbnails: no forward pass. The page loads nothing from the network: no script at all,
the probe's sweep is inline SVG (drawn by vl-convert), the fine-tuning curve a PNG embedded
as a data URI, and a Content-Security-Policy forbids any other source, so the folder can be
copied or attached as it is. The HTML is a Jinja2 template (flows/templates/report.html.j2)
with autoescaping: a relpath such as `<b>.jpg` is shown, never interpreted.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from markupsafe import Markup

from tlflow.flows.artifacts import MODELS, Snapshot
from tlflow.flows.committed import NO_RUN, Committed, read_committed
from tlflow.flows.history import current_data_version
from tlflow.tasks.lib.assess.changes import ImageChange
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path, write_text
from tlflow.tasks.lib.core.handoff.audit import AuditImage, Balance, Duplicates, LabelIssues
from tlflow.tasks.lib.core.handoff.evaluate import (
    ClassScores,
    Coverage,
    ImagePrediction,
    PerClass,
    Predictions,
    Scores,
)
from tlflow.tasks.lib.core.handoff.finetune import FinetuneCurve
from tlflow.tasks.lib.core.handoff.train import ProbeReport, Strategy
from tlflow.tasks.lib.core.paths import Paths

# out-of-fold accuracy of the audit's probes below which the page warns that the likely label
# errors it lists are as much the probes' own mistakes (hymenoptera at 64 px, a probe of test
# accuracy 0.78: 49 of 245 images listed)
WEAK_PROBE = 0.9

THUMBS = "thumbs"  # beside the page: thumbs/<sha256>.jpg
SWEEP = "sweep"  # beside the page: sweep/<hash>.svg, the sweep chart while it is the same
THUMB_SIDE = 160  # pixels, the longer side
MAX_GALLERY = 500  # images shown per gallery (the counts are complete)
_THUMB_NAME = re.compile(r"^[0-9a-f]{64}\.jpg$")


@dataclass(frozen=True)
class Written:
    """What write_report wrote: the page, its thumbnails, and the counts it shows."""

    page: Path
    thumbnails: int
    misclassified: dict[str, int]  # model -> test images it gets wrong
    near_duplicates: int
    label_issues: int


def _template():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(("html", "j2")), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def headline_rows(before: dict[str, Scores], after: dict[str, Scores]) -> list[dict[str, Any]]:
    """Per model: test accuracy and macro F1 now, and their change since `before`."""
    rows = []
    for model in MODELS:
        now, was = after.get(model), before.get(model)
        if now is None:
            continue
        rows.append({"model": model, "n": after["probe"].n,
                     "accuracy": now.accuracy, "macro_f1": now.macro_f1,
                     "accuracy_delta": None if was is None else now.accuracy - was.accuracy,
                     "macro_f1_delta": None if was is None else now.macro_f1 - was.macro_f1})
    return rows


def confusion(preds: list[ImagePrediction], classes: list[str]) -> dict[str, Any]:
    """Counts (actual x predicted) of one model's predictions, with a shade per cell (0..1:
    the cell's share of its row) for the template."""
    index = {c: i for i, c in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for p in preds:
        if p.label in index and p.top and p.top[0] in index:
            counts[index[p.label]][index[p.top[0]]] += 1
    rows = [{"actual": c, "cells": [{"n": n, "shade": round(n / max(1, sum(r)), 3),
                                     "diagonal": i == j} for j, n in enumerate(r)]}
            for i, (c, r) in enumerate(zip(classes, counts, strict=True))]
    return {"classes": classes, "rows": rows}


def curve_png(path: Path) -> str | None:
    """The fine-tuning curve (train loss and val accuracy per epoch) as a PNG data URI; None
    without a curve."""
    if not path.is_file():
        return None
    points = FinetuneCurve.read(path).points
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epoch = [p.epoch for p in points]
    fig, loss_ax = plt.subplots(figsize=(6, 3.2))
    loss_ax.plot(epoch, [p.train_loss for p in points], "o-", color="tab:red")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss", color="tab:red")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(epoch, [p.val_accuracy for p in points], "s-", color="tab:blue")
    acc_ax.set_ylabel("val accuracy", color="tab:blue")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sweep_chart(paths: Paths) -> Markup | None:
    """The probe's sweep (val accuracy per C, a line per layer, the chosen one ringed) as
    inline SVG (flows/charts.py); None before train has run."""
    if not paths.probe_report.is_file():
        return None
    from tlflow.flows.charts import sweep_svg

    svg = sweep_svg(ProbeReport.read(paths.probe_report), paths.report.parent / SWEEP)
    return Markup(svg) if svg else None


def coverage_view(paths: Paths, metrics: dict[str, Scores]) -> dict[str, Any] | None:
    """The probe's reject option: at each min confidence the share of test images kept and
    the accuracy on them (plots/coverage.csv), with the calibration error before and after
    temperature scaling; None when evaluate wrote none."""
    if not paths.coverage.is_file():
        return None
    rows = Coverage.read(paths.coverage).rows
    if not rows:
        return None
    probe = metrics.get("probe")
    return {"rows": rows, "ece": probe and probe.ece, "ece_t": probe and probe.ece_t}


def compare_view(paths: Paths) -> dict[str, Any] | None:
    """The backbones of extract.compare as a table (header, rows, the rule, the winner),
    from train's reports/compare.json; None when no comparison ran."""
    from tlflow.flows.artifacts import compare_table
    from tlflow.tasks.lib.assess.compare import RULE

    found = compare_table(paths)
    return {"header": found[0], "rows": found[1], "rule": RULE} if found else None


def map_view(paths: Paths, preds: list[ImagePrediction],
             thumb: Thumbnails) -> dict[str, Any] | None:
    """The embedding map of the probe's test images (flows/embedding_map.py) on the chosen
    layer's codes; None before train and evaluate have run."""
    mine = [p for p in preds if p.model == "probe"]
    if not mine or not paths.probe_report.is_file():
        return None
    from tlflow.flows.embedding_map import MAP, embedding_map
    from tlflow.tasks.lib.core.handoff.extract import current_store

    layer = ProbeReport.read(paths.probe_report).best.layer
    return embedding_map(mine, current_store(paths.features), layer,
                         paths.report.parent / MAP, thumb)


def new_images_view(paths: Paths, thumb: Thumbnails) -> dict[str, Any] | None:
    """What the last `tlflow run` made of the images it brought (flows/drift.py), the novel
    ones with thumbnails (at most drift.MAX_LISTED, farthest first); None when it judged
    nothing or the data changed since."""
    from tlflow.flows.drift import this_run

    judged = this_run(paths)
    if judged is None:
        return None
    shown = [{**g.model_dump(), "thumb": thumb(g.relpath, g.sha256)} for g in judged.images]
    return {**judged.model_dump(), "shown": shown}


def advice_view(paths: Paths) -> dict[str, Any] | None:
    """The 2x2 table's cells (the data set's marked) and the reasons, from the advice."""
    if not paths.strategy.is_file():
        return None
    from tlflow.tasks.lib.probe.strategy import PLANS, table

    decision = Strategy.read(paths.strategy)
    cells = [{"size": size, "plans": [{"plan": PLANS[size, sim], "here": (
        decision.size, decision.similarity) == (size, sim)}
        for sim in ("similar", "dissimilar")]} for size in ("small", "large")]
    reasons = [line[2:].replace("**", "") for line in table(decision).splitlines()
               if line.startswith("- ")]
    return {"plan": decision.plan, "carried_out": decision.carried_out, "cells": cells,
            "reasons": reasons}


def changes_view(paths: Paths, committed: Committed, per_class: tuple[ClassScores, ...],
                 preds: list[ImagePrediction], thumb: Thumbnails) -> dict[str, Any]:
    """What changed since the committed run (tasks/lib/assess/changes.py): per class (accuracy then,
    now, the delta), per test image (newly wrong, newly right; the first MAX_CHANGED of each
    with thumbnails) and the data (images added and removed, by class); a note for each
    part the committed run cannot give."""
    from tlflow.tasks.lib.assess import changes
    from tlflow.tasks.lib.data.manifest import read_manifest

    classes = (changes.class_deltas(committed.per_class, per_class)
               if committed.per_class is not None and per_class else [])
    images = [{"model": c.model, "common": c.common,
               "wrong": len(c.newly_wrong), "right": len(c.newly_right),
               "newly_wrong": [_change(x, thumb) for x in c.newly_wrong[:changes.MAX_CHANGED]],
               "newly_right": [_change(x, thumb) for x in c.newly_right[:changes.MAX_CHANGED]]}
              for c in (changes.image_changes(committed.predictions, preds)
                        if committed.predictions is not None else ())]
    data = None
    if committed.manifest is not None and paths.manifest.is_file():
        now = read_manifest(paths.manifest)
        data = {"then": len(committed.manifest), "now": len(now),
                "classes": changes.data_changes(committed.manifest, now)}
    return {"against": committed.name, "found": bool(committed.metrics),
            "notes": list(committed.notes), "classes": classes, "images": images,
            "data": data, "max": changes.MAX_CHANGED}


def _change(change: ImageChange, thumb: Thumbnails) -> dict[str, Any]:
    """One newly wrong or newly right image as the template shows it."""
    then, now = change.then, change.now
    return {"relpath": now.relpath, "label": now.label, "thumb": thumb(now.relpath, now.sha256),
            "then": (then.top[0], then.scores[0]) if then.top else ("?", 0.0),
            "now": (now.top[0], now.scores[0]) if now.top else ("?", 0.0)}


class Thumbnails:
    """JPEG thumbnails of the images the page shows, made once per sha256."""

    def __init__(self, folder: Path, images: Path) -> None:
        self.folder, self.images = folder, images
        self.used: set[str] = set()

    def __call__(self, relpath: str, sha256: str) -> str | None:
        """The thumbnail's path relative to the page; None when the image cannot be read."""
        name = f"{sha256}.jpg"
        if not _THUMB_NAME.match(name):
            return None
        dest = self.folder / name
        if not dest.is_file():
            try:
                self._make(self.images / relpath, dest)
            except TlflowError:
                return None
        self.used.add(name)
        return f"{THUMBS}/{name}"

    @staticmethod
    def _make(src: Path, dest: Path) -> None:
        from PIL import Image

        from tlflow.tasks.lib.data.decode import read_image

        img = read_image(src, lambda im: im.convert("RGB"))
        img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC)
        with atomic_path(dest) as tmp:
            img.save(tmp, format="JPEG", quality=80)

    def prune(self) -> None:
        """Remove the thumbnails this page no longer shows (only files named like ours)."""
        if self.folder.is_dir():
            for f in self.folder.iterdir():
                if _THUMB_NAME.match(f.name) and f.name not in self.used:
                    f.unlink()


def _gallery(preds: list[ImagePrediction], thumb: Thumbnails) -> list[dict[str, Any]]:
    """The misclassified images, hardest (highest loss) first."""
    wrong = sorted((p for p in preds if not p.correct), key=lambda p: (-p.loss, p.relpath))
    return [{"relpath": p.relpath, "label": p.label, "loss": p.loss, "kind": p.kind,
             "thumb": thumb(p.relpath, p.sha256),
             "top": list(zip(p.top, p.scores, strict=True))} for p in wrong[:MAX_GALLERY]]


def _audit(paths: Paths, thumb: Thumbnails) -> dict[str, Any] | None:
    """The audit's three summaries with thumbnails; None before the audit stage has run."""
    if not all(p.is_file() for p in (paths.duplicates, paths.label_issues, paths.balance)):
        return None
    dups = Duplicates.read(paths.duplicates)
    issues = LabelIssues.read(paths.label_issues)

    def shown(image: AuditImage) -> dict[str, Any]:
        return {**image.model_dump(), "thumb": thumb(image.relpath, image.sha256)}

    pairs = [{**p.model_dump(), "image": shown(p.image), "train_image": shown(p.train_image)}
             for p in dups.near_duplicates.pairs]
    conflicts = [{**g.model_dump(), "images": [shown(i) for i in g.images]}
                 for g in dups.label_conflicts.groups]
    return {"duplicates": dups, "pairs": pairs, "conflicts": conflicts, "issues": issues,
            "issue_images": [shown(i) for i in issues.images],
            "balance": Balance.read(paths.balance)}


def render(paths: Paths, before: dict[str, Scores], after: Snapshot, compared_with: str,
           thumb: Thumbnails, committed: Committed | None = None) -> tuple[str, dict[str, Any]]:
    """The page's HTML and the data it shows."""
    preds = list(Predictions.read(paths.predictions).rows) if paths.predictions.is_file() \
        else []
    per_class = PerClass.read(paths.per_class).rows if paths.per_class.is_file() else ()
    models = []
    for model in MODELS:
        mine = [p for p in preds if p.model == model]
        if not mine:
            continue
        classes = sorted({p.label for p in mine} | {p.top[0] for p in mine if p.top})
        models.append({"name": model, "n": len(mine), "wrong": sum(not p.correct for p in mine),
                       "kind": mine[0].kind, "confusion": confusion(mine, classes),
                       "gallery": _gallery(mine, thumb)})
    data = {
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "data_version": after.data_version, "images": len(after.images),
        "compared_with": compared_with, "headline": headline_rows(before, after.metrics),
        "per_class": per_class, "models": models,
        "changes": changes_view(paths, committed, per_class, preds, thumb)
        if committed else None,
        "sweep": sweep_chart(paths), "map": map_view(paths, preds, thumb),
        "compare": compare_view(paths), "coverage": coverage_view(paths, after.metrics),
        "new_images": new_images_view(paths, thumb),
        "curve": curve_png(paths.finetune_curve),
        "advice": advice_view(paths),
        "audit": _audit(paths, thumb), "max_gallery": MAX_GALLERY,
        "weak_probe": WEAK_PROBE,
    }
    return _template().render(**data), data


def write_report(paths: Paths, before: dict[str, Scores] | None = None,
                 compared_with: str = "the previous run", against: str | None = None,
                 root: Path = Path()) -> Written:
    """Write the page and its thumbnails (atomically, the page last). What changed is shown
    against the run committed at `against` (default HEAD) in the project at root (the current
    directory); `before` holds the metrics the headline compares with (default: that run's).
    A revision the user named (`against`) that names no commit is a TlflowError."""
    if not paths.eval_metrics.is_file():
        raise TlflowError(f"{paths.eval_metrics}: not found (written by the evaluate stage: "
                          "run `tlflow run` first)")
    committed = read_committed(root, paths, against or "HEAD", named=against is not None)
    if before is None:
        before = committed.metrics
        compared_with = (f"the run committed at {committed.name}" if before
                         else f"nothing ({NO_RUN})")
    folder = paths.report.parent / THUMBS
    folder.mkdir(parents=True, exist_ok=True)
    thumb = Thumbnails(folder, paths.images)
    html, data = render(paths, before, Snapshot.take(paths), compared_with, thumb, committed)
    write_text(paths.report, html)
    thumb.prune()
    audit = data["audit"]
    return Written(paths.report, len(thumb.used),
                   {m["name"]: m["wrong"] for m in data["models"]},
                   audit["duplicates"].near_duplicates.count if audit else 0,
                   audit["issues"].count if audit else 0)


def write_html_report(paths: Paths, before: Snapshot) -> str:
    """The offline HTML report against the metrics before the run; one line saying where it
    is (or why it could not be written: the run itself succeeded)."""
    now = current_data_version(paths)
    compared_with = "the previous run"
    if before.data_version is not None and now != before.data_version:
        compared_with += (f", on other data (data version {before.data_version}): the changes "
                          "mix the data's effect with the model's")
    try:
        written = write_report(paths, before.metrics, compared_with)
    except TlflowError as err:
        return f"report: not written ({err})"
    return f"report: {written.page} ({written.thumbnails} thumbnails)"
