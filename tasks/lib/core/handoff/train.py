"""The files train writes: the probe report (the sweep), its DVC metric and plot, the
strategy, what fine-tuning takes from train, and the comparison of backbones."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from pydantic import computed_field

from tlflow.tasks.lib.core.files import write_json, write_text
from tlflow.tasks.lib.core.handoff.base import Handoff, Record, csv_text


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
    write_text(path, csv_text(["C", "log10_C", *layers], (
        [f"{C:g}", f"{math.log10(C):.6g}",
         *(f"{acc[layer, C]:.6g}" if (layer, C) in acc else "" for layer in layers)]
        for C in sorted({r.C for r in sweep}))))


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
