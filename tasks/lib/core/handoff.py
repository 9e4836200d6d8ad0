"""The files one stage writes and another reads: one pydantic model each, whose fields are the
file's keys, read and written by the same class (`Model.read(path)`, `model.write(path)`).

| file (base.paths)            | model        | written by | read by                        |
|------------------------------|--------------|------------|--------------------------------|
| <features>/current.json      | Pointer      | extract    | train (the candidates), predict|
| extract_report               | ExtractReport| extract    | train, finetune, evaluate      |
| probe_report                 | ProbeReport  | train      | advise, audit, summary, report |
| compare_report               | CompareReport| train      | tlflow compare, the reports    |
| strategy                     | Strategy     | train      | advise, the run summary        |
| train_choice                 | TrainChoice  | train      | finetune (only what it uses)   |
| eval_metrics                 | EvalMetrics  | evaluate   | the run summary, history       |
| per_class                    | PerClass     | evaluate   | the run summary, the report    |
| predictions                  | Predictions  | evaluate   | the run summary, the report    |
| coverage                     | Coverage     | evaluate   | the report                     |
| finetune_curve               | FinetuneCurve| finetune   | the report                     |
| duplicates                   | Duplicates   | audit      | the run summary, the report    |
| label_issues                 | LabelIssues  | audit      | the run summary, the report    |
| balance                      | Balance      | audit      | the report                     |
| new_images                   | NewImages    | tlflow run | the run summary, the report    |

Files only DVC reads have a writer and no model: the sweep (a plot) and the DVC metrics
extract_metrics, probe_metrics, test_metrics and audit_metrics, which hold a few numbers
each (and the probe's layer name) under short names (`acc` is the chosen probe's val
accuracy in probe_metrics, its test accuracy in test_metrics; `n` the images in the
manifest), so `dvc metrics show` fits 120 columns with fine-tuning on. eval_metrics has
every test score, nested by model as users' scripts read it (`["probe"]["accuracy"]`); it is
git-tracked, not a DVC metric. `dvc metrics diff` compares numbers; the details behind them are
reports/ files and plots.

(The manifest's owner is tasks/lib/data/manifest.py; the model files' sidecars are
tasks/lib/probe/head.py's HeadSidecar and tasks/lib/finetune/network.py's NetworkMeta.)
A missing or malformed file is a TlflowError naming the file and the stage that writes it. A
model ignores keys it does not know (a newer tlflow's file still reads) and requires the ones
it does, unless a default says what an older tlflow's file meant without them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from tlflow.tasks.lib.core.errors import handoff_error
from tlflow.tasks.lib.core.files import write_json, write_text

POINTER = "current.json"  # <features>/current.json: the store the current params select


class Record(BaseModel):
    """A typed record inside a hand-off file: frozen, unknown keys ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Handoff(Record):
    """A JSON file one stage (`STAGE`) writes and others read."""

    STAGE: ClassVar[str]

    @classmethod
    def read(cls, path: Path) -> Self:
        """The file at `path`. Raises TlflowError naming it and STAGE when it is missing or
        malformed."""
        if not path.is_file():
            raise handoff_error(path, cls.STAGE)
        return cls.parse(path.read_bytes(), path)

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> Self:
        """The model from the file's text (e.g. as committed at a git revision); `path` names
        it in the error."""
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise handoff_error(path, cls.STAGE, f"not valid JSON ({err})") from None
        try:
            return cls.model_validate(obj)
        except ValidationError as err:
            raise handoff_error(path, cls.STAGE, problem(err)) from None

    def as_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return self.model_dump(mode="json", by_alias=True)

    def write(self, path: Path) -> None:
        """Write the file atomically, keys sorted (the same model gives the same bytes)."""
        write_json(path, self.as_json())


def problem(err: ValidationError) -> str:
    """pydantic's first complaint as a phrase: where in the file, and what."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the file"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg'].lower()}{more}"


# ---------------------------------------------------------------- extract


class Candidate(Record):
    """One backbone extract computed codes with (extract.backbone, then extract.compare):
    what builds it again, its store, and what it costs. Train fits the same probe on each
    candidate's store and the best on val serves (tasks/lib/assess/compare.py)."""

    backbone: str  # <source>/<model>
    weights: str  # as extract.weights: packaged | imagenet | none | a file
    extractor_id: str  # its store is <features>/<extractor_id>.h5
    input_size: int  # pixels, as extract resolved extract.image_size for it
    dims: dict[str, int]  # code size D per layer
    gflops: float | None = None  # per image at input_size (torch's FlopCounterMode); compare
    parameters: int | None = None  # the backbone's, its ImageNet classifier included; compare

    def store(self, features_dir: Path) -> Path:
        return features_dir / f"{self.extractor_id}.h5"


class Pointer(Handoff):
    """<features>/current.json: the store the current params select (extract.backbone's) and
    every candidate of a comparison (that one first)."""

    STAGE: ClassVar[str] = "extract"
    extractor_id: str
    store: str  # the file's name in the features folder
    extractor: dict[str, Any]  # the extractor's description (featurestore's)
    candidates: tuple[Candidate, ...] = ()

    @classmethod
    def at(cls, features_dir: Path) -> Pointer:
        return cls.read(features_dir / POINTER)

    def write_to(self, features_dir: Path) -> None:
        self.write(features_dir / POINTER)


def current_store(features_dir: Path) -> Path:
    """The store the last extract run selected."""
    return features_dir / Pointer.at(features_dir).store


def read_candidates(features_dir: Path) -> tuple[Candidate, ...]:
    """The backbones the last extract run computed codes with, extract.backbone's first."""
    found = Pointer.at(features_dir).candidates
    if not found:
        raise handoff_error(features_dir / POINTER, "extract", "lists no candidate backbone")
    return found


def chosen_store(features_dir: Path, extractor_id: str, origin: Path) -> Path:
    """The store of the extractor a model was trained on (its sidecar says which, `origin`):
    with extract.compare that is the winner's, not always extract.backbone's."""
    path = features_dir / f"{extractor_id}.h5"
    if not path.is_file():
        raise handoff_error(origin, "train", f"names the codes of extractor {extractor_id}, "
                            f"which {features_dir} does not hold; rerun `tlflow run`")
    return path


def current_input_size(features_dir: Path) -> int:
    """The input size in pixels the current store's codes were computed at (extract resolves
    extract.image_size once; fine-tuning and predict use the same)."""
    try:
        return int(Pointer.at(features_dir).extractor["preprocess"]["input_size"][-1])
    except (KeyError, TypeError, IndexError, ValueError):
        raise handoff_error(features_dir / POINTER, "extract", "names no input size") from None


class BadImage(Record):
    """A manifest file extract could not read."""

    relpath: str
    sha256: str
    reason: str


class ExtractReport(Handoff):
    """How many image files the manifest holds and which could not be read: one entry per
    file (relpath), every copy of the same bytes listed. A function of (manifest, extractor)
    only: a rerun that computes nothing changes nothing."""

    STAGE: ClassVar[str] = "extract"
    extractor_id: str
    images: int
    bad_images: tuple[BadImage, ...]
    image_size: int | None = None  # the input size used, in pixels
    image_size_why: str = ""  # how extract.image_size resolved to it

    @property
    def bad(self) -> dict[str, str]:
        """sha256 -> why it could not be read."""
        return {b.sha256: b.reason for b in self.bad_images}

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "skipped": len(self.bad_images)}


def write_extract_metrics(path: Path, report: ExtractReport) -> None:
    """metrics/extract.json: `n`, the images in the manifest (how many were skipped as
    unreadable, and which, is the extract report's)."""
    write_json(path, {"n": report.images})


# ---------------------------------------------------------------- train


class SweepRow(Record):
    """One (layer, C) of train's sweep, or a layer's best C."""

    layer: str
    dim: int  # the layer's code size D
    C: float  # inverse regularization strength (scikit-learn's C)
    val_accuracy: float  # on val, or the k-fold CV accuracy without a val split


class ProbeChoice(Record):
    """The probe train chose and saved: its (layer, C), what it was fitted on, and the
    backbone whose codes it reads."""

    classifier: str  # train.classifier: logistic | svm
    layer: str
    C: float
    val_accuracy: float
    extractor_id: str  # the codes: <features>/<extractor_id>.h5
    val_set: str | None = None  # the val images' identity (probes.val_set_id)
    backbone: str | None = None
    weights: str | None = None
    input_size: int | None = None  # pixels


class ProbeReport(Handoff):
    """reports/probe.json: the chosen (layer, C), one row per layer, the whole sweep."""

    STAGE: ClassVar[str] = "train"
    best: ProbeChoice
    layers: tuple[SweepRow, ...]
    sweep: tuple[SweepRow, ...]


def write_probe_metrics(path: Path, best: ProbeChoice,
                        compared: dict[str, float] | None = None) -> None:
    """metrics/probe.json: the chosen probe's val accuracy (`acc`), C and layer (the one
    string); after a comparison of backbones, one number per backbone (its val accuracy,
    keyed by its short model name under `compare`: compare.short_names), not the table
    (reports/compare.json)."""
    obj: dict[str, Any] = {"acc": best.val_accuracy, "C": best.C, "layer": best.layer}
    if compared:
        obj["compare"] = compared
    write_json(path, obj)


def write_sweep(path: Path, sweep: list[SweepRow]) -> None:
    """plots/sweep.csv, the sweep as a DVC plot: one row per C (ascending), its log10 (the
    plot's x: the grid is log-spaced), then the val accuracy of each layer in a column named
    after it (as extract.layers names it, which dvc.yaml's plot lists as its y); empty where
    the sweep did not fit that layer at that C."""
    layers = list(dict.fromkeys(r.layer for r in sweep))
    acc = {(r.layer, r.C): r.val_accuracy for r in sweep}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["C", "log10_C", *layers])
    for C in sorted({r.C for r in sweep}):
        w.writerow([f"{C:g}", f"{math.log10(C):.6g}",
                    *(f"{acc[layer, C]:.6g}" if (layer, C) in acc else "" for layer in layers)])
    write_text(path, buf.getvalue())


class Strategy(Handoff):
    """reports/strategy.json: where the data set sits in the 2x2 table (size x similarity),
    the plan that follows, and whether fine-tuning carries it out (tasks/lib/probe/strategy.py)."""

    STAGE: ClassVar[str] = "train"
    size: str  # small | large
    similarity: str  # similar | dissimilar
    plan: str  # probe | early_probe | finetune_top | finetune_all
    forced: bool = False  # advise.strategy named the plan instead of the table
    evidence: dict[str, Any]  # the measurements behind size and similarity, by name
    carried_out: bool = False  # fine-tuning follows the plan (advise.strategy: auto)


class TrainChoice(Handoff):
    """The values of train's results that fine-tuning uses, and nothing else: a C_grid change
    that leaves them the same leaves this file's bytes, and so finetune, untouched."""

    STAGE: ClassVar[str] = "train"
    pooled_C: float | None  # the C the sweep chose for pooled codes (the head's start)
    plan: str | None  # the plan fine-tuning carries out; None under advise.strategy: manual
    backbone: str  # the backbone the probe was trained on (extract.compare's winner) ...
    weights: str  # ... its weights (as extract.weights)
    extractor_id: str  # ... and its codes: <features>/<extractor_id>.h5
    input_size: int  # pixels, the codes' input size


# ---------------------------------------------------------------- compare


class CompareRow(Record):
    """One candidate backbone's probe under the shared protocol, and its costs
    (tasks/lib/assess/compare.py measures and picks them)."""

    backbone: str
    extractor_id: str
    input_size: int  # pixels
    code_dim: int  # D of the chosen layer
    layer: str
    C: float
    val_accuracy: float
    n_val: int  # val images
    test_accuracy: float | None  # reported only; None when the test split is empty
    images_per_s: float | None  # measured when its store was filled, on this machine
    gflops: float | None  # per image at input_size
    parameters: int | None
    store_mb: float  # the store's size on disk, MiB

    @computed_field  # written to the file beside the others; computed, never read back
    @property
    def val_se(self) -> float:
        """The binomial standard error of the val accuracy, sqrt(p (1 - p) / n_val) (0
        without val images)."""
        p = self.val_accuracy
        return math.sqrt(p * (1 - p) / self.n_val) if self.n_val else 0.0


class CompareReport(Handoff):
    """reports/compare.json: one row per candidate backbone, the rule and the winner;
    `compared` false (and nothing else) when extract.compare is empty."""

    STAGE: ClassVar[str] = "train"
    compared: bool
    rule: str | None = None
    winner: str | None = None  # the winner's backbone
    winner_extractor_id: str | None = None
    rows: tuple[CompareRow, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return super().as_json() if self.compared else {"compared": False}


# ---------------------------------------------------------------- evaluate


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


class PerClass(Handoff):
    """plots/per_class.csv: one row per class (the first model's order), its support, then
    <model>_precision, <model>_recall, <model>_f1 for each model (DVC's bar chart of F1)."""

    STAGE: ClassVar[str] = "evaluate"
    rows: tuple[ClassScores, ...]

    @classmethod
    def from_scores(cls, scores: dict[str, dict[str, Any]]) -> PerClass:
        """From evaluation.score's results per model (their `per_class` tables)."""
        return cls(rows=tuple(
            ClassScores(model=m, label=c, precision=v["precision"], recall=v["recall"],
                        f1=v["f1-score"], support=v["support"])
            for m, s in scores.items() for c, v in s["per_class"].items()))

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> PerClass:
        try:
            table = list(csv.DictReader(io.StringIO(
                text.decode("utf-8") if isinstance(text, bytes) else text)))
            models = [h[: -len("_precision")] for h in table[0] if h.endswith("_precision")] \
                if table else []
            return cls(rows=tuple(ClassScores(
                model=m, label=r["class"], precision=float(r[f"{m}_precision"]),
                recall=float(r[f"{m}_recall"]), f1=float(r[f"{m}_f1"]),
                support=int(r["support"])) for m in models for r in table))
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise handoff_error(path, cls.STAGE, f"not a per-class table ({err})") from None

    def write(self, path: Path) -> None:
        models = list(dict.fromkeys(r.model for r in self.rows))
        labels = list(dict.fromkeys(r.label for r in self.rows if r.model == models[0]))
        cell = {(r.model, r.label): r for r in self.rows}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["class", "support"] + [f"{m}_{k}" for m in models
                                           for k in ("precision", "recall", "f1")])
        for c in labels:
            w.writerow([c, cell[models[0], c].support]
                       + [f"{v:.6g}" for m in models for v in
                          (cell[m, c].precision, cell[m, c].recall, cell[m, c].f1)])
        write_text(path, buf.getvalue())


class CoverageRow(Record):
    """The reject option at one min confidence (tasks/lib/probe/calibration.coverage_table)."""

    min_confidence: float  # P in [0, 1]: images below it are "unsure"
    coverage: float  # the share of test images kept (confidence >= P), in [0, 1]
    accuracy: float | None  # on those kept, in [0, 1]; None when none is
    kept: int  # test images kept


COVERAGE_COLUMNS = ("min_confidence", "coverage", "accuracy", "kept")


class Coverage(Handoff):
    """plots/coverage.csv (a DVC plot): one row per min confidence, the probe's calibrated
    confidence on the test split; no row for decision values without a temperature."""

    STAGE: ClassVar[str] = "evaluate"
    rows: tuple[CoverageRow, ...]

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> Coverage:
        try:
            table = list(csv.DictReader(io.StringIO(
                text.decode("utf-8") if isinstance(text, bytes) else text)))
            if table and set(COVERAGE_COLUMNS) - set(table[0]):
                raise KeyError(f"expected the columns {list(COVERAGE_COLUMNS)}")
            return cls(rows=tuple(CoverageRow(
                min_confidence=float(r["min_confidence"]), coverage=float(r["coverage"]),
                accuracy=float(r["accuracy"]) if r["accuracy"] != "" else None,
                kept=int(r["kept"])) for r in table))
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise handoff_error(path, cls.STAGE, f"not a coverage table ({err})") from None

    def write(self, path: Path) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COVERAGE_COLUMNS)
        for r in self.rows:
            w.writerow([f"{r.min_confidence:g}", f"{r.coverage:.6g}",
                        "" if r.accuracy is None else f"{r.accuracy:.6g}", r.kept])
        write_text(path, buf.getvalue())


# ---------------------------------------------------------------- finetune


class CurvePoint(Record):
    """One fine-tuning epoch (tasks/lib/finetune/loop.py, rounded to 6 decimals there)."""

    epoch: int  # numbered along the whole curve (a second phase continues the first's)
    train_loss: float  # mean cross-entropy over the epoch's batches, nats per image
    val_accuracy: float  # after the epoch, in [0, 1]


CURVE_COLUMNS = ("epoch", "train_loss", "val_accuracy")


class FinetuneCurve(Handoff):
    """plots/finetune.csv (a DVC plot): one row per epoch run, in order; only the header when
    fine-tuning is off."""

    STAGE: ClassVar[str] = "finetune"
    points: tuple[CurvePoint, ...]

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> FinetuneCurve:
        try:
            table = list(csv.DictReader(io.StringIO(
                text.decode("utf-8") if isinstance(text, bytes) else text)))
            return cls(points=tuple(CurvePoint(
                epoch=int(r["epoch"]), train_loss=float(r["train_loss"]),
                val_accuracy=float(r["val_accuracy"])) for r in table))
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise handoff_error(path, cls.STAGE, f"not a fine-tuning curve ({err})") from None

    def write(self, path: Path) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CURVE_COLUMNS)
        w.writerows((p.epoch, p.train_loss, p.val_accuracy) for p in self.points)
        write_text(path, buf.getvalue())


# ---------------------------------------------------------------- per-image predictions


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


class Predictions(Handoff):
    """plots/predictions.csv: one row per (model, test image), then pred_i, score_i for the
    k best labels (empty where a model knows fewer classes)."""

    STAGE: ClassVar[str] = "evaluate"
    rows: tuple[ImagePrediction, ...]
    k: int = Field(default=1, ge=1)  # labels kept per image

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> Predictions:
        try:
            table = list(csv.DictReader(io.StringIO(
                text.decode("utf-8") if isinstance(text, bytes) else text)))
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
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise handoff_error(path, cls.STAGE, f"not a predictions table ({err})") from None

    def write(self, path: Path) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*PREDICTION_COLUMNS, *(f"{c}_{i}" for i in range(1, self.k + 1)
                                           for c in ("pred", "score"))])
        for p in self.rows:
            tops = [v for i in range(self.k) for v in ((p.top[i], f"{p.scores[i]:.6g}")
                                                       if i < len(p.top) else ("", ""))]
            w.writerow([p.model, p.relpath, p.sha256, p.label, int(p.correct),
                        f"{p.loss:.6g}", p.kind, *tops])
        write_text(path, buf.getvalue())


# ---------------------------------------------------------------- audit


class AuditImage(Record):
    """An image the audit names."""

    relpath: str
    sha256: str
    label: str
    split: str


class NearDuplicatePair(Record):
    similarity: float  # cosine of the centred codes
    exact: bool  # the same bytes
    image: AuditImage  # in val or test
    train_image: AuditImage


class NearDuplicates(Record):
    threshold: float  # the similarity from which a pair is listed
    train_typical: float | None = None  # the train split's typical nearest similarity
    count: int  # pairs across splits (all of them; `pairs` lists the first max_listed)
    pairs: tuple[NearDuplicatePair, ...]


class FileGroup(Record):
    """Files with the same bytes (one sha256)."""

    sha256: str
    labels: tuple[str, ...]
    splits: tuple[str, ...] = ()
    crosses_splits: bool = False
    images: tuple[AuditImage, ...]


class FileGroups(Record):
    count: int  # groups
    files: int | None = None  # files in them
    groups: tuple[FileGroup, ...]  # the first max_listed


class Duplicates(Handoff):
    """reports/duplicates.json: near-duplicates across splits, one file under two labels,
    the same bytes under several names (tasks/lib/assess/audit.py)."""

    STAGE: ClassVar[str] = "audit"
    threshold: float
    layer: str | None = None  # the codes compared
    near_duplicates: NearDuplicates
    label_conflicts: FileGroups
    identical_files: FileGroups | None = None


class LabelIssue(AuditImage):
    suggested: str  # the label the out-of-fold probes suggest
    p_label: float  # their probability of the given label ...
    p_suggested: float  # ... and of the suggested one


class LabelIssues(Handoff):
    """reports/label_issues.json: likely label errors (confident learning), the least
    self-confident first (tasks/lib/audit.label_issues)."""

    STAGE: ClassVar[str] = "audit"
    method: str
    layer: str | None = None
    C: tuple[float, ...] = ()
    checked: int | None = None  # train + val images checked
    folds: int = 0
    oof_accuracy: float | None = None  # how often the out-of-fold probes agree with labels
    count: int
    images: tuple[LabelIssue, ...]  # the first max_listed
    skipped: str | None = None  # why nothing was checked


class Balance(Handoff):
    """reports/balance.json: images per class and split, per split the largest class over
    the smallest (None when a class is missing there) and the classes it lacks."""

    STAGE: ClassVar[str] = "audit"
    classes: tuple[str, ...]
    splits: dict[str, dict[str, int]]
    imbalance: dict[str, float | None] = {}
    missing: dict[str, list[str]] = {}


def write_audit_metrics(path: Path, counts: dict[str, int]) -> None:
    """metrics/audit.json: near-duplicate pairs across splits (`dups`) and likely label errors
    (`label_issues`); the other counts are the audit reports' (duplicates, label_issues)."""
    write_json(path, {"dups": counts["near_duplicates"], "label_issues": counts["label_issues"]})


# ---------------------------------------------------------------- the flow: new images


class NewImage(Record):
    """A new image the previous probe finds novel."""

    relpath: str
    sha256: str
    label: str
    split: str
    distance: float  # to its k-th nearest training code, in the probe's novelty space


class NewImages(Handoff):
    """base.paths.new_images: the images a `tlflow run` brought (in its manifest, not in the
    previous run's), judged against the probe that served before the run retrained it
    (flows/drift.py): how many are novel, or why they could not be judged. Written by the
    flow after extract; read by the run summary, `tlflow run`'s output and the report. No
    file: the run brought nothing to judge (a first run, or no new image)."""

    STAGE: ClassVar[str] = "run"
    new: int  # new images with codes (extract's unreadable ones left out)
    novel: int | None  # None: not judged
    reason: str = ""  # why not judged ("" when judged)
    extractor_id: str | None = None  # the previous probe's codes
    layer: str | None = None
    k: int | None = None
    threshold: float | None = None
    images: tuple[NewImage, ...] = ()  # the novel ones, farthest first, at most max_listed
    max_listed: int = 0
    manifest_sha256: str | None = None  # the manifest whose new images these are

    @property
    def judged(self) -> bool:
        return self.novel is not None

    @classmethod
    def read(cls, path: Path) -> Self:
        """The file; a missing or malformed one is a TlflowError naming it and `tlflow run`."""
        from tlflow.tasks.lib.core.errors import TlflowError

        try:
            return super().read(path)
        except TlflowError as err:
            problem = str(err).removeprefix(f"{path}: ").split(" (written by")[0]
            raise TlflowError(f"{path}: {problem} (written by `tlflow run` after extract, "
                              "when a run brings new images)") from None
