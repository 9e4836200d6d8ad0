"""Train: a linear probe on the cached codes, layer and C chosen on the val split, refit on
train + val (tasks/lib/probe/sweep.py; `sgd` streams the codes, tasks/lib/probe/sgd.py).

A function of its inputs: the same manifest, codes and params give the same head, byte for
byte, whatever was there before. Which model serves is decided later, by `tlflow promote`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlflow.tasks.lib.assess import compare
from tlflow.tasks.lib.core.handoff.extract import Candidate, ExtractReport, read_candidates
from tlflow.tasks.lib.core.handoff.train import (
    CompareReport,
    CompareRow,
    ProbeChoice,
    ProbeReport,
    Strategy,
    SweepRow,
    TrainChoice,
    write_probe_metrics,
    write_sweep,
)
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.core.params import Train as TrainCfg
from tlflow.tasks.lib.data.manifest import Row, read_manifest, without
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.probe import strategy
from tlflow.tasks.lib.probe.head import HeadMeta, LinearHead, save_head
from tlflow.tasks.lib.probe.sgd import sweep_stream
from tlflow.tasks.lib.probe.sweep import (
    Refit,
    best,
    layer_table,
    sweep_in_memory,
    to_head,
    val_set_id,
)
from tlflow.tasks.lib.probe.trust import attach, describe

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

# what this stage reads besides base.paths (dvc.yaml: params); not train.promote_margin,
# which only `tlflow promote` reads
PARAMS = ("base.seed", "train.classifier", "train.C_grid", "train.max_iter", "train.normalize",
          "train.class_weight", "train.cv", "train.loss", "train.epochs", "train.buffer_rows",
          "advise")


def choose(params: Params, store: Path, rows: list[Row], table: list[SweepRow],
           layers: list[SweepRow]) -> tuple[Strategy, SweepRow]:
    """The advice (always measured and written) and the sweep row the probe is refit from:
    the best overall, or under advise.strategy the plan's layer (pooled or an earlier one).
    `layers` is layer_table(table)."""
    decision = strategy.measure(store, rows, layers, params.advise, params.base.seed)
    layer = strategy.layer_for(decision, layers) if decision.carried_out else None
    return decision, best([r for r in table if layer is None or r.layer == layer])


def sweep_store(path: Path, rows: list[Row], cfg: TrainCfg, seed: int) -> tuple[list, Refit]:
    """The sweep of layers and C on one store's codes, and its refit on train + val, each
    (layer, C) fitted once: the comparison's row and the saved head share the winner's."""
    if cfg.classifier == "sgd":
        with FeatureStore(path) as store:
            dims = store.layers
        table, refit = sweep_stream(path, rows, dims, cfg, seed)
    else:
        table, refit = sweep_in_memory(path, rows, cfg, seed)
    fitted: dict[tuple[str, float], Pipeline] = {}

    def once(top: SweepRow) -> Pipeline:
        key = (top.layer, top.C)
        if key not in fitted:
            fitted[key] = refit(top)
        return fitted[key]

    return table, once


def measure(c: Candidate, path: Path, rows: list[Row], table: list[SweepRow],
            refit: Refit) -> CompareRow:
    """One candidate's row of the comparison: its best (layer, C) on val, refit on train +
    val and scored on test (reported, never used to choose), and its costs."""
    top = best(table)
    head = to_head(refit(top), HeadMeta(layer=top.layer, extractor_id=c.extractor_id))
    test = [r for r in rows if r.split == "test"]
    with FeatureStore(path) as store:
        speed, size = store.images_per_second, store.size_bytes() / 1e6
        x = store.read(top.layer, [r.sha256 for r in test]) if test else None
    accuracy = float(np.mean(head.predict(x) == np.array([r.label for r in test]))) \
        if test else None
    return CompareRow(
        backbone=c.backbone, extractor_id=c.extractor_id, input_size=c.input_size,
        code_dim=c.dims[top.layer], layer=top.layer, C=top.C, val_accuracy=top.val_accuracy,
        n_val=sum(r.split == "val" for r in rows), test_accuracy=accuracy, images_per_s=speed,
        gflops=c.gflops, parameters=c.parameters, store_mb=size)


def run(params: Params) -> LinearHead:
    """Sweep layers and C on val, refit the chosen one on train + val; save the head, the
    sweep table, the advice, and what fine-tuning takes from them. With extract.compare, the
    same sweep on each candidate backbone's codes first, and the winner's probe is saved
    (tasks/lib/assess/compare.py: the rule)."""
    cfg, paths, seed = params.train, params.base.paths, params.base.seed
    rows = without(read_manifest(paths.manifest), ExtractReport.read(paths.extract_report).bad)
    candidates = read_candidates(paths.features)
    stores = [c.store(paths.features) for c in candidates]
    sweeps = [sweep_store(p, rows, cfg, seed) for p in stores]
    winner, compared, per_backbone = 0, CompareReport(compared=False), None
    if len(candidates) > 1:
        results = [measure(c, p, rows, *sw) for c, p, sw in zip(candidates, stores, sweeps,
                                                                   strict=True)]
        winner = compare.pick(results)
        compared = compare.report(results, winner)
        per_backbone = compare.val_accuracies(compared)
        print(compare.format_table(compared), flush=True)
    chosen, path = candidates[winner], stores[winner]
    table, refit = sweeps[winner]
    layers = layer_table(table)
    decision, top = choose(params, path, rows, table, layers)
    choice = ProbeChoice(classifier=cfg.classifier, layer=top.layer, extractor_id=path.stem,
                         C=top.C, val_accuracy=top.val_accuracy, val_set=val_set_id(rows),
                         backbone=chosen.backbone, weights=chosen.weights,
                         input_size=chosen.input_size)
    head = attach(to_head(refit(top), HeadMeta.model_validate(choice.model_dump())), path,
                  rows, cfg, seed)
    save_head(head, paths.head)  # ^ calibration, novelty
    ProbeReport(best=choice, layers=tuple(layers), sweep=tuple(table)).write(paths.probe_report)
    write_sweep(paths.sweep, table)
    write_probe_metrics(paths.probe_metrics, choice, per_backbone)
    compared.write(paths.compare_report)
    decision.write(paths.strategy)
    pooled_C = next((r.C for r in layers if r.layer == strategy.POOLED), None)
    TrainChoice(pooled_C=pooled_C, plan=decision.plan if decision.carried_out else None,
                backbone=chosen.backbone, weights=chosen.weights,
                extractor_id=chosen.extractor_id,
                input_size=chosen.input_size).write(paths.train_choice)
    print(f"train: layer {top.layer} (C={top.C:g}), val accuracy "
          f"{top.val_accuracy:.4f} -> {paths.head}", flush=True)
    print(f"train: advice: {decision.size} and {decision.similarity} -> "
          f"{decision.plan}{'' if decision.carried_out else ' (advise.strategy: manual)'}",
          flush=True)
    print(f"train: {describe(head.meta)}", flush=True)
    return head
