"""The files one stage writes and another reads, each with its one reader and writer.

| file (base.paths)            | written by | read by                               |
|------------------------------|------------|---------------------------------------|
| <features>/current.json      | extract    | train (the candidates), predict       |
| extract_report               | extract    | train, finetune, evaluate             |
| probe_report                 | train      | advise, audit, the run summary, report|
| compare_report               | train      | tlflow compare, the reports           |
| sweep (a plot)               | train      | `dvc plots show`, `tlflow plots`      |
| strategy                     | train      | advise, the run summary               |
| train_choice                 | train      | finetune (only the values it uses)    |
| eval_metrics                 | evaluate   | the run summary, history              |
| per_class                    | evaluate   | the run summary                       |
| predictions                  | evaluate   | the run summary, the HTML report      |
| duplicates, label_issues,    | audit      | the run summary, the HTML report      |
| balance                      |            |                                       |

The DVC metrics (extract_metrics, probe_metrics, eval_metrics, audit_metrics) hold a few
numbers each (and the probe's layer name). eval_metrics is nested by model, as users' scripts
read it (`["probe"]["accuracy"]`); the others use short names (`acc` is the chosen probe's
val accuracy, `n` the images in the manifest). `dvc metrics diff` compares numbers; the
details behind them are reports/ files and plots.

(The manifest's owner is tasks/lib/manifest.py; the model files' are head.py and network.py.)
A missing or malformed file is a TlflowError naming the file and the stage that writes it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tlflow.tasks.lib.errors import handoff_error
from tlflow.tasks.lib.files import write_json, write_text

POINTER = "current.json"  # <features>/current.json: the store the current params select


def _read(path: Path, stage: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object with at least `keys`, or an error naming the file and its stage."""
    if not path.is_file():
        raise handoff_error(path, stage)
    return _parse(path.read_bytes(), path, stage, keys)


def _parse(text: str | bytes, path: Path, stage: str, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise handoff_error(path, stage, f"not valid JSON ({err})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise handoff_error(path, stage, f"expected a JSON object with keys {list(keys)}")
    return obj


# ---------------------------------------------------------------- extract


@dataclass(frozen=True)
class Candidate:
    """One backbone extract computed codes with (extract.backbone, then extract.compare):
    what builds it again, its store, and what it costs. Train fits the same probe on each
    candidate's store and the best on val serves (tasks/lib/compare.py)."""

    backbone: str  # <source>/<model>
    weights: str  # as extract.weights: packaged | imagenet | none | a file
    extractor_id: str  # its store is <features>/<extractor_id>.h5
    input_size: int  # pixels, as extract resolved extract.image_size for it
    dims: dict[str, int]  # code size D per layer
    gflops: float | None = None  # per image at input_size (torch's FlopCounterMode); compare
    parameters: int | None = None  # the backbone's, its ImageNet classifier included; compare

    def store(self, features_dir: Path) -> Path:
        return features_dir / f"{self.extractor_id}.h5"


def write_pointer(features_dir: Path, store: Path, extractor: dict[str, Any],
                  candidates: tuple[Candidate, ...] = ()) -> None:
    """Point the stages downstream at the store the current params select (extract.backbone's)
    and list every candidate of a comparison (that one first)."""
    write_json(features_dir / POINTER, {"extractor_id": store.stem, "store": store.name,
                                         "extractor": extractor,
                                         "candidates": [asdict(c) for c in candidates]})


def current_store(features_dir: Path) -> Path:
    """The store the last extract run selected."""
    obj = _read(features_dir / POINTER, "extract", ("store",))
    return features_dir / obj["store"]


def read_candidates(features_dir: Path) -> tuple[Candidate, ...]:
    """The backbones the last extract run computed codes with, extract.backbone's first."""
    path = features_dir / POINTER
    obj = _read(path, "extract", ("candidates",))
    try:
        found = tuple(Candidate(**c) for c in obj["candidates"])
    except TypeError as err:
        raise handoff_error(path, "extract", f"a candidate is malformed ({err})") from None
    if not found:
        raise handoff_error(path, "extract", "lists no candidate backbone")
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
    obj = _read(features_dir / POINTER, "extract", ("extractor",))
    try:
        return int(obj["extractor"]["preprocess"]["input_size"][-1])
    except (KeyError, TypeError, IndexError, ValueError):
        raise handoff_error(features_dir / POINTER, "extract", "names no input size") from None


@dataclass(frozen=True)
class ExtractReport:
    """How many image files the manifest holds and which could not be read: one entry per
    file (relpath), every copy of the same bytes listed; `bad` maps sha256 -> reason."""

    extractor_id: str
    images: int
    bad_images: tuple[dict[str, str], ...]  # relpath, sha256, reason
    image_size: int | None = None  # the input size used, in pixels
    image_size_why: str = ""  # how extract.image_size resolved to it

    @property
    def bad(self) -> dict[str, str]:
        return {b["sha256"]: b["reason"] for b in self.bad_images}


def write_extract_report(path: Path, report: ExtractReport) -> None:
    """A function of (manifest, extractor) only: a rerun that computes nothing changes nothing."""
    write_json(path, {"extractor_id": report.extractor_id, "images": report.images,
                      "skipped": len(report.bad_images), "bad_images": list(report.bad_images),
                      "image_size": report.image_size, "image_size_why": report.image_size_why})


def write_extract_metrics(path: Path, report: ExtractReport) -> None:
    """metrics/extract.json: `n`, the images in the manifest (how many were skipped as
    unreadable, and which, is the extract report's)."""
    write_json(path, {"n": report.images})


def read_extract_report(path: Path) -> ExtractReport:
    obj = _read(path, "extract", ("extractor_id", "images", "bad_images"))
    return ExtractReport(obj["extractor_id"], obj["images"], tuple(obj["bad_images"]),
                         obj.get("image_size"), obj.get("image_size_why", ""))


# ---------------------------------------------------------------- train


def write_probe_report(path: Path, best: dict[str, Any], layers: list[dict],
                       sweep: list[dict]) -> None:
    """reports/probe.json: the chosen (layer, C), one row per layer, the whole sweep."""
    write_json(path, {"best": best, "layers": layers, "sweep": sweep})


def write_probe_metrics(path: Path, best: dict[str, Any],
                        compared: dict[str, Any] | None = None) -> None:
    """metrics/probe.json: the chosen probe's val accuracy (`acc`), C and layer (the one
    string); after a comparison of backbones, one number per backbone (its val accuracy,
    keyed by its short model name under `compare`: compare.short_names), not the table
    (reports/compare.json)."""
    obj: dict[str, Any] = {"acc": best["val_accuracy"], "C": best["C"], "layer": best["layer"]}
    if compared and compared.get("compared"):
        from tlflow.tasks.lib.compare import short_names

        rows = compared["rows"]
        names = short_names([r["backbone"] for r in rows])
        obj["compare"] = {n: r["val_accuracy"] for n, r in zip(names, rows, strict=True)}
    write_json(path, obj)


def write_sweep(path: Path, sweep: list[dict]) -> None:
    """plots/sweep.csv, the sweep as a DVC plot: one row per C (ascending), its log10 (the
    plot's x: the grid is log-spaced), then the val accuracy of each layer in a column named
    after it (as extract.layers names it, which dvc.yaml's plot lists as its y); empty where
    the sweep did not fit that layer at that C."""
    import math

    layers = list(dict.fromkeys(r["layer"] for r in sweep))
    acc = {(r["layer"], r["C"]): r["val_accuracy"] for r in sweep}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["C", "log10_C", *layers])
    for C in sorted({r["C"] for r in sweep}):
        w.writerow([f"{C:g}", f"{math.log10(C):.6g}",
                    *(f"{acc[layer, C]:.6g}" if (layer, C) in acc else "" for layer in layers)])
    write_text(path, buf.getvalue())


def read_probe_report(path: Path) -> dict[str, Any]:
    return _read(path, "train", ("best", "layers", "sweep"))


def write_strategy(path: Path, decision: dict[str, Any]) -> None:
    write_json(path, decision)


def read_strategy(path: Path) -> dict[str, Any]:
    return _read(path, "train", ("size", "similarity", "plan", "evidence"))


@dataclass(frozen=True)
class TrainChoice:
    """The values of train's results that fine-tuning uses, and nothing else: a C_grid change
    that leaves them the same leaves this file's bytes, and so finetune, untouched."""

    pooled_C: float | None  # the C the sweep chose for pooled codes (the head's start)
    plan: str | None  # the plan fine-tuning carries out; None under advise.strategy: manual
    backbone: str  # the backbone the probe was trained on (extract.compare's winner) ...
    weights: str  # ... its weights (as extract.weights)
    extractor_id: str  # ... and its codes: <features>/<extractor_id>.h5
    input_size: int  # pixels, the codes' input size


def write_train_choice(path: Path, choice: TrainChoice) -> None:
    write_json(path, asdict(choice))


def read_train_choice(path: Path) -> TrainChoice:
    keys = ("pooled_C", "plan", "backbone", "weights", "extractor_id", "input_size")
    obj = _read(path, "train", keys)
    return TrainChoice(*(obj[k] for k in keys))


# ---------------------------------------------------------------- compare


def write_compare_report(path: Path, report: dict[str, Any]) -> None:
    """reports/compare.json: one row per candidate backbone, the rule and the winner
    (tasks/lib/compare.py builds it); {"compared": false} when extract.compare is empty."""
    write_json(path, report)


def read_compare_report(path: Path) -> dict[str, Any]:
    return _read(path, "train", ("compared",))


# ---------------------------------------------------------------- evaluate


# per model, as read_eval_metrics returns them (the ECEs: the probe's, where evaluate has them)
EVAL_KEYS = ("accuracy", "macro_f1", "n", "ece", "ece_t")
# their names in metrics/eval.json: the probe's plain, the fine-tuned network's with "ft_"
EVAL_NAMES = {"accuracy": "acc", "macro_f1": "f1", "n": "n", "ece": "ece", "ece_t": "ece_t"}
MODEL_PREFIX = {"probe": "", "finetune": "ft_"}
PER_CLASS_KEYS = ("precision", "recall", "f1-score")  # per model in the per-class CSV


def write_eval_metrics(path: Path, scores: dict[str, dict[str, Any]]) -> None:
    """metrics/eval.json: {"probe": {accuracy, macro_f1, n, ece, ece_t}, "finetune":
    {accuracy, macro_f1}} from evaluation.score's results (the expected calibration errors
    before and after temperature scaling where evaluate adds them); their per-class tables go
    to write_per_class. Nested by model, as every tlflow release wrote it: users' scripts read
    `["probe"]["accuracy"]`. The fine-tuned network is scored on the probe's test images, so
    its n is left out, and its ECEs too (fewer columns in `dvc metrics show`)."""
    write_json(path, {model: {k: s[k] for k in EVAL_KEYS
                              if k in s and (model == "probe" or k in ("accuracy", "macro_f1"))}
                      for model, s in scores.items()})


def write_per_class(path: Path, scores: dict[str, dict[str, Any]]) -> None:
    """plots/per_class.csv: one row per class (the first model's order), its support, then
    <model>_precision, <model>_recall, <model>_f1 for each model (DVC's bar chart of F1)."""
    models = list(scores)
    header = ["class", "support"] + [f"{m}_{k.split('-')[0]}" for m in models
                                     for k in PER_CLASS_KEYS]
    first = scores[models[0]]["per_class"]
    rows = [[c, first[c]["support"]] + [f"{scores[m]['per_class'][c][k]:.6g}" for m in models
                                        for k in PER_CLASS_KEYS] for c in first]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_text(path, buf.getvalue())


def read_per_class(path: Path) -> list[dict[str, Any]]:
    """The per-class table as rows of (model, class, precision, recall, f1-score, support)."""
    if not path.is_file():
        raise handoff_error(path, "evaluate")
    try:
        table = list(csv.DictReader(io.StringIO(path.read_text())))
        models = [h[: -len("_precision")] for h in table[0] if h.endswith("_precision")] \
            if table else []
        return [{"model": m, "class": r["class"],
                 **{k: float(r[f"{m}_{k.split('-')[0]}"]) for k in PER_CLASS_KEYS},
                 "support": int(r["support"])} for m in models for r in table]
    except (KeyError, ValueError, TypeError) as err:
        raise handoff_error(path, "evaluate", f"not a per-class table ({err})") from None


def read_eval_metrics(path: Path) -> dict[str, Any]:
    """{model: {accuracy, macro_f1[, n]}} (probe, and finetune when it ran)."""
    if not path.is_file():
        raise handoff_error(path, "evaluate")
    return parse_eval_metrics(path.read_bytes(), path)


def parse_eval_metrics(text: str | bytes, path: Path) -> dict[str, Any]:
    """The eval metrics from their JSON text (e.g. as committed at a git revision), as
    {model: {accuracy, macro_f1[, n, ece, ece_t]}}: the nested form is read as it is; a
    file committed while it had short names (acc, f1, n, ft_acc, ft_f1) is read into it."""
    obj = _parse(text, path, "evaluate", ())
    if "probe" in obj:  # nested by model, as evaluate writes it
        return obj
    if "acc" not in obj:
        raise handoff_error(path, "evaluate", "expected a JSON object with keys ['acc', ...]")
    return {model: {k: obj[prefix + name] for k, name in EVAL_NAMES.items()
                    if prefix + name in obj}
            for model, prefix in MODEL_PREFIX.items() if prefix + "acc" in obj}


# ---------------------------------------------------------------- per-image predictions


@dataclass(frozen=True)
class ImagePrediction:
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


def write_predictions(path: Path, preds: list[ImagePrediction], k: int) -> None:
    """plots/predictions.csv: one row per (model, test image), then pred_i, score_i for the
    k best labels (empty where a model knows fewer classes)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*PREDICTION_COLUMNS, *(f"{c}_{i}" for i in range(1, k + 1)
                                       for c in ("pred", "score"))])
    for p in preds:
        tops = [v for i in range(k) for v in ((p.top[i], f"{p.scores[i]:.6g}")
                                              if i < len(p.top) else ("", ""))]
        w.writerow([p.model, p.relpath, p.sha256, p.label, int(p.correct), f"{p.loss:.6g}",
                    p.kind, *tops])
    write_text(path, buf.getvalue())


def read_predictions(path: Path) -> list[ImagePrediction]:
    """The per-image predictions evaluate wrote, in file order."""
    if not path.is_file():
        raise handoff_error(path, "evaluate")
    try:
        table = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        out = []
        for r in table:
            k = sum(1 for c in r if c.startswith("pred_"))
            ranks = [i for i in range(1, k + 1) if r[f"pred_{i}"] != ""]
            out.append(ImagePrediction(
                r["model"], r["relpath"], r["sha256"], r["label"],
                tuple(r[f"pred_{i}"] for i in ranks),
                tuple(float(r[f"score_{i}"]) for i in ranks), r["kind"], float(r["loss"]),
                r["correct"] == "1"))
        return out
    except (KeyError, ValueError, TypeError) as err:
        raise handoff_error(path, "evaluate", f"not a predictions table ({err})") from None


# ---------------------------------------------------------------- audit


AUDIT_KEYS = {"duplicates": ("threshold", "near_duplicates", "label_conflicts"),
              "label_issues": ("method", "count", "images"),
              "balance": ("splits",)}


def write_audit(path: Path, report: dict[str, Any]) -> None:
    """One of the audit's JSON summaries (duplicates, label_issues, balance)."""
    write_json(path, report)


def read_audit(path: Path, kind: str) -> dict[str, Any]:
    """An audit summary: `kind` is duplicates, label_issues or balance."""
    return _read(path, "audit", AUDIT_KEYS[kind])


def write_audit_metrics(path: Path, counts: dict[str, int]) -> None:
    """metrics/audit.json: near-duplicate pairs across splits (`dups`) and likely label errors
    (`label_issues`); the other counts are the audit reports' (duplicates, label_issues)."""
    write_json(path, {"dups": counts["near_duplicates"], "label_issues": counts["label_issues"]})
