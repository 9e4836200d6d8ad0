"""Choosing the backbone by measurement: the candidates of extract.compare, what each costs,
the rule that picks the winner, and the comparison table.

Every candidate gets the same protocol (train's sweep of layers and C on val, then a refit on
train + val), so the table compares backbones, not tuning. The rule: the best val accuracy
wins; a candidate within one standard error of it (sqrt(p (1 - p) / n_val), the binomial
standard error of the best's val accuracy) ties, and ties go to the cheaper backbone (fewer
GFLOPs per image, then fewer parameters, then the order of params.yaml). Test accuracy is
reported beside it and never used to choose.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tlflow.tasks.lib.core.handoff.train import CompareReport, CompareRow
from tlflow.tasks.lib.features.backbones import PACKAGED

if TYPE_CHECKING:
    from tlflow.tasks.lib.core.params import Extract
    from tlflow.tasks.lib.features.backbones import Backbone

RULE = ("best val accuracy; within one val standard error of it, the fewest GFLOPs per image, "
        "then the fewest parameters, then the order in params.yaml")


def candidate_specs(cfg: Extract) -> list[tuple[str, str]]:
    """(backbone, weights) of extract.backbone, then of each extract.compare entry not equal
    to it: weights `packaged` where tlflow packages them (EfficientNet-Lite0/1/2), else
    `imagenet` (the library's download and cache)."""
    specs = [(cfg.backbone, cfg.weights)]
    for name in cfg.compare:
        if name != cfg.backbone:
            model = name.partition("/")[2]
            packaged = name.startswith("timm/") and model in PACKAGED
            specs.append((name, "packaged" if packaged else "imagenet"))
    return specs


def cost(backbone: Backbone) -> tuple[float, int]:
    """(GFLOPs per image at the backbone's input size, parameters): the FLOPs of one forward
    pass of one image through the whole network, counted by torch's own FlopCounterMode
    (torch.utils.flop_counter: 2 FLOPs per multiply-add of convolutions and matmuls), and the
    parameter count, ImageNet classifier included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.input_size
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        backbone.model(torch.zeros(1, 3, size, size))
    params = sum(p.numel() for p in backbone.model.parameters())
    return counter.get_total_flops() / 1e9, int(params)


def pick(results: list[CompareRow]) -> int:
    """The index of the winner under RULE."""
    best = max(r.val_accuracy for r in results)
    se = next(r.val_se for r in results if r.val_accuracy == best)
    tied = [i for i, r in enumerate(results) if r.val_accuracy >= best - se]

    def cheap(i: int) -> tuple[float, float, int]:
        r = results[i]
        return (r.gflops if r.gflops is not None else math.inf,
                r.parameters if r.parameters is not None else math.inf, i)

    return min(tied, key=cheap)


def report(results: list[CompareRow], winner: int) -> CompareReport:
    """reports/compare.json: the rows, the rule, the winner."""
    return CompareReport(compared=True, rule=RULE, winner=results[winner].backbone,
                         winner_extractor_id=results[winner].extractor_id, rows=tuple(results))


def val_accuracies(rep: CompareReport) -> dict[str, float]:
    """One number per backbone for metrics/probe.json: its val accuracy, keyed by its short
    name (short_names)."""
    names = short_names([r.backbone for r in rep.rows])
    return {n: r.val_accuracy for n, r in zip(names, rep.rows, strict=True)}


def short_names(backbones: list[str]) -> list[str]:
    """Short, distinct names for metric keys: the model names without their source and
    without the prefix they all share up to a `_` (tf_efficientnet_lite0, ..._lite2 ->
    lite0, lite2; resnet50 beside tf_efficientnet_lite0 stays as it is; the same model from
    two sources keeps its source: timm_resnet18, torchvision_resnet18)."""
    names = [b.partition("/")[2] or b for b in backbones]
    if len(set(names)) < len(names):  # the same model from two sources
        return [b.replace("/", "_") for b in backbones]
    if len(names) < 2:
        return names
    columns = zip(*names, strict=False)  # up to the shortest name
    same = next((i for i, chars in enumerate(columns) if len(set(chars)) > 1),
                min(map(len, names)))
    cut = names[0][:same].rfind("_") + 1
    return [n[cut:] for n in names]


COLUMNS = (("backbone", "backbone", "{}"), ("input_size", "px", "{}"),
           ("code_dim", "dim", "{}"), ("layer", "layer", "{}"),
           ("val_accuracy", "val acc", "{:.4f}"), ("val_se", "± se", "{:.4f}"),
           ("test_accuracy", "test acc", "{:.4f}"), ("images_per_s", "img/s", "{:.1f}"),
           ("gflops", "GFLOPs", "{:.2f}"), ("parameters", "params M", "{:.2f}"),
           ("store_mb", "store MB", "{:.1f}"))


def table(rep: CompareReport) -> tuple[list[str], list[list[str]]]:
    """The comparison as (header, rows of cells), the winner's row marked with `*`."""
    header = [title for _, title, _ in COLUMNS]
    out = []
    for row in rep.rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = getattr(row, key)
            if key == "parameters" and value is not None:
                value = value / 1e6
            if key == "backbone":
                mark = "*" if row.extractor_id == rep.winner_extractor_id else " "
                value = f"{mark}{value.partition('/')[2] or value}"
            cells.append("-" if value is None else fmt.format(value))
        out.append(cells)
    return header, out


def format_table(rep: CompareReport) -> str:
    """The table as aligned text, the rule and the winner below it."""
    header, rows = table(rep)
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(line, widths, strict=True))) for line in [header, *rows]]
    return "\n".join([*lines, f"* serves: {rep.winner} (rule: {rep.rule})"])
