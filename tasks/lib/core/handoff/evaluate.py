"""The files evaluate writes: the test scores (nested, and in short for DVC), the
per-class table, the accuracy-coverage table and the per-image predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from tlflow.tasks.lib.core.files import write_json, write_text
from tlflow.tasks.lib.core.handoff.base import CsvHandoff, Handoff, Record, csv_text


class Scores(Record):
    """One model's test metrics."""

    accuracy: float
    macro_f1: float
    n: int | None = None  # test images (the probe's; the fine-tuned network sees the same)
    ece: float | None = None  # expected calibration error (the probe's), before ...
    ece_t: float | None = None  # ... and after temperature scaling


# their names in metrics/eval.json while it was flat: the probe's plain, the fine-tuned
# network's with "ft_" (a file committed then still reads)
_FLAT = {"accuracy": "acc", "macro_f1": "f1", "n": "n", "ece": "ece", "ece_t": "ece_t"}
_FLAT_PREFIX = {"probe": "", "finetune": "ft_"}


class EvalMetrics(Handoff):
    """metrics/eval.json: {"probe": {accuracy, macro_f1, n, ece, ece_t}, "finetune":
    {accuracy, macro_f1, ece, ece_t}}. Nested by model, as every tlflow release wrote it:
    users' scripts read `["probe"]["accuracy"]`. The fine-tuned network is scored on the
    probe's test images, so its n is left out. `ece`, `ece_t`: the expected calibration error
    before and after the temperature its sidecar records (fit on val). A file committed while
    it had short names (acc, f1, n, ft_acc, ft_f1) reads into the same."""

    STAGE: ClassVar[str] = "evaluate"
    probe: Scores
    finetune: Scores | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, obj: Any) -> Any:
        if isinstance(obj, dict) and "probe" not in obj and "acc" in obj:
            return {model: {k: obj[prefix + name] for k, name in _FLAT.items()
                            if prefix + name in obj}
                    for model, prefix in _FLAT_PREFIX.items() if prefix + "acc" in obj}
        return obj

    @classmethod
    def from_scores(cls, scores: dict[str, dict[str, Any]]) -> EvalMetrics:
        """From evaluation.score's results per model (the ECEs where evaluate adds them)."""
        keep = {"probe": set(_FLAT), "finetune": {"accuracy", "macro_f1", "ece", "ece_t"}}
        return cls.model_validate({m: {k: v for k, v in s.items() if k in keep[m]}
                                   for m, s in scores.items()})

    def models(self) -> dict[str, Scores]:
        """The scored models by name: probe, then finetune when it ran."""
        return {"probe": self.probe} | ({"finetune": self.finetune} if self.finetune else {})

    def as_json(self) -> dict[str, Any]:
        return {m: s.model_dump(exclude_none=True) for m, s in self.models().items()}


def write_test_metrics(path: Path, metrics: EvalMetrics) -> None:
    """metrics/test.json, what `dvc metrics show` reads of the test split: the probe's
    accuracy and macro F1 (`acc`, `f1`) and the fine-tuned network's (`ft_acc`, `ft_f1`)
    when it ran; four short columns (metrics/eval.json has them all, nested by model)."""
    obj = {"acc": metrics.probe.accuracy, "f1": metrics.probe.macro_f1}
    if metrics.finetune is not None:
        obj |= {"ft_acc": metrics.finetune.accuracy, "ft_f1": metrics.finetune.macro_f1}
    write_json(path, obj)


PER_CLASS_KEYS = ("precision", "recall", "f1-score")  # per model, scikit-learn's names


class ClassScores(Record):
    """One class's test scores under one model (scikit-learn's classification_report)."""

    model: str  # probe | finetune
    label: str  # the class
    precision: float
    recall: float
    f1: float
    support: int  # test images of the class


class PerClass(CsvHandoff):
    """plots/per_class.csv: one row per class (the first model's order), its support, then
    <model>_precision, <model>_recall, <model>_f1 for each model (DVC's bar chart of F1)."""

    STAGE: ClassVar[str] = "evaluate"
    WHAT: ClassVar[str] = "a per-class table"
    rows: tuple[ClassScores, ...]

    @classmethod
    def from_scores(cls, scores: dict[str, dict[str, Any]]) -> PerClass:
        """From evaluation.score's results per model (their `per_class` tables)."""
        return cls(rows=tuple(
            ClassScores(model=m, label=c, precision=v["precision"], recall=v["recall"],
                        f1=v["f1-score"], support=v["support"])
            for m, s in scores.items() for c, v in s["per_class"].items()))

    @classmethod
    def from_rows(cls, table: list[dict[str, str]]) -> PerClass:
        models = [h[: -len("_precision")] for h in table[0] if h.endswith("_precision")] \
            if table else []
        return cls(rows=tuple(ClassScores(
            model=m, label=r["class"], precision=float(r[f"{m}_precision"]),
            recall=float(r[f"{m}_recall"]), f1=float(r[f"{m}_f1"]),
            support=int(r["support"])) for m in models for r in table))

    def write(self, path: Path) -> None:
        models = list(dict.fromkeys(r.model for r in self.rows))
        labels = list(dict.fromkeys(r.label for r in self.rows if r.model == models[0]))
        cell = {(r.model, r.label): r for r in self.rows}
        header = ["class", "support"] + [f"{m}_{k}" for m in models
                                         for k in ("precision", "recall", "f1")]
        write_text(path, csv_text(header, ([c, cell[models[0], c].support]
                                           + [f"{v:.6g}" for m in models for v in
                                              (cell[m, c].precision, cell[m, c].recall,
                                               cell[m, c].f1)] for c in labels)))


class CoverageRow(Record):
    """The reject option at one min confidence (tasks/lib/probe/calibration.coverage_table)."""

    min_confidence: float  # P in [0, 1]: images below it are "unsure"
    coverage: float  # the share of test images kept (confidence >= P), in [0, 1]
    accuracy: float | None  # on those kept, in [0, 1]; None when none is
    kept: int  # test images kept


COVERAGE_COLUMNS = ("min_confidence", "coverage", "accuracy", "kept")


class Coverage(CsvHandoff):
    """plots/coverage.csv (a DVC plot): one row per min confidence, the probe's calibrated
    confidence on the test split; no row for decision values without a temperature."""

    STAGE: ClassVar[str] = "evaluate"
    WHAT: ClassVar[str] = "a coverage table"
    rows: tuple[CoverageRow, ...]

    @classmethod
    def from_rows(cls, table: list[dict[str, str]]) -> Coverage:
        if table and set(COVERAGE_COLUMNS) - set(table[0]):
            raise KeyError(f"expected the columns {list(COVERAGE_COLUMNS)}")
        return cls(rows=tuple(CoverageRow(
            min_confidence=float(r["min_confidence"]), coverage=float(r["coverage"]),
            accuracy=float(r["accuracy"]) if r["accuracy"] != "" else None,
            kept=int(r["kept"])) for r in table))

    def write(self, path: Path) -> None:
        write_text(path, csv_text(COVERAGE_COLUMNS, (
            [f"{r.min_confidence:g}", f"{r.coverage:.6g}",
             "" if r.accuracy is None else f"{r.accuracy:.6g}", r.kept] for r in self.rows)))


class ImagePrediction(Record):
    """One model's answer for one test image: its top-k labels with their scores
    (probabilities, or a linear SVM's decision values: `kind` says which), the loss on the
    true label and whether the top label is right."""

    model: str  # probe | finetune
    relpath: str
    sha256: str
    label: str  # the true label
    top: tuple[str, ...]  # the k best labels, best first
    scores: tuple[float, ...]  # their scores
    kind: str  # probability | decision
    loss: float  # cross-entropy (probabilities) or multiclass hinge (decision values)
    correct: bool


PREDICTION_COLUMNS = ("model", "relpath", "sha256", "label", "correct", "loss", "kind")


class Predictions(CsvHandoff):
    """plots/predictions.csv: one row per (model, test image), then pred_i, score_i for the
    k best labels (empty where a model knows fewer classes)."""

    STAGE: ClassVar[str] = "evaluate"
    WHAT: ClassVar[str] = "a predictions table"
    rows: tuple[ImagePrediction, ...]
    k: int = Field(default=1, ge=1)  # labels kept per image

    @classmethod
    def from_rows(cls, table: list[dict[str, str]]) -> Predictions:
        k = sum(1 for c in table[0] if c.startswith("pred_")) if table else 1
        out = []
        for r in table:
            ranks = [i for i in range(1, k + 1) if r[f"pred_{i}"] != ""]
            out.append(ImagePrediction(
                model=r["model"], relpath=r["relpath"], sha256=r["sha256"],
                label=r["label"], top=tuple(r[f"pred_{i}"] for i in ranks),
                scores=tuple(float(r[f"score_{i}"]) for i in ranks), kind=r["kind"],
                loss=float(r["loss"]), correct=r["correct"] == "1"))
        return cls(rows=tuple(out), k=max(k, 1))

    def write(self, path: Path) -> None:
        def row(p: ImagePrediction) -> list[object]:
            tops = [v for i in range(self.k) for v in ((p.top[i], f"{p.scores[i]:.6g}")
                                                       if i < len(p.top) else ("", ""))]
            return [p.model, p.relpath, p.sha256, p.label, int(p.correct), f"{p.loss:.6g}",
                    p.kind, *tops]

        header = [*PREDICTION_COLUMNS, *(f"{c}_{i}" for i in range(1, self.k + 1)
                                         for c in ("pred", "score"))]
        write_text(path, csv_text(header, map(row, self.rows)))
