"""Train: a linear probe on the cached codes, layer and C chosen on the val split, refit on
train + val (tasks/lib/probes.py; `sgd` streams the codes, tasks/lib/stream.py).

A function of its inputs: the same manifest, codes and params give the same head, byte for
byte, whatever was there before. Which model serves is decided later, by `tlflow promote`.
"""

from __future__ import annotations

from tlflow.tasks.lib import advice
from tlflow.tasks.lib.featurestore import FeatureStore
from tlflow.tasks.lib.handoff import (
    TrainChoice,
    current_store,
    read_extract_report,
    write_probe_metrics,
    write_probe_report,
    write_strategy,
    write_sweep,
    write_train_choice,
)
from tlflow.tasks.lib.head import LinearHead, save_head
from tlflow.tasks.lib.manifest import Row, read_manifest, without
from tlflow.tasks.lib.params import Params
from tlflow.tasks.lib.probes import best, layer_table, sweep_in_memory, to_head, val_set_id
from tlflow.tasks.lib.stream import sweep_stream

# what this stage reads besides base.paths (dvc.yaml: params); not train.promote_margin,
# which only `tlflow promote` reads
PARAMS = ("base.seed", "train.classifier", "train.C_grid", "train.max_iter", "train.normalize",
          "train.class_weight", "train.cv", "train.loss", "train.epochs", "train.buffer_rows",
          "advise")


def choose(params: Params, rows: list[Row], table: list[dict],
           layers: list[dict]) -> tuple[dict, dict]:
    """The advice (always measured and written) and the sweep row the probe is refit from:
    the best overall, or under advise.strategy the plan's layer (pooled or an earlier one).
    `layers` is layer_table(table)."""
    store = current_store(params.base.paths.features)
    decision = advice.measure(store, rows, layers, params.advise, params.base.seed)
    carried_out = params.advise.strategy != "manual"
    layer = advice.layer_for(decision, layers) if carried_out else None
    top = best([r for r in table if layer is None or r["layer"] == layer])
    return {**decision.as_json(), "carried_out": carried_out}, top


def run(params: Params) -> LinearHead:
    """Sweep layers and C on val, refit the chosen one on train + val; save the head, the
    sweep table, the advice, and what fine-tuning takes from them."""
    cfg, paths, seed = params.train, params.base.paths, params.base.seed
    rows = without(read_manifest(paths.manifest), read_extract_report(paths.extract_report).bad)
    path = current_store(paths.features)
    if cfg.classifier == "sgd":
        with FeatureStore(path) as store:
            dims = store.layers
        table, refit = sweep_stream(path, rows, dims, cfg, seed)
    else:
        table, refit = sweep_in_memory(path, rows, cfg, seed)
    layers = layer_table(table)
    decision, top = choose(params, rows, table, layers)
    meta = {"classifier": cfg.classifier, "layer": top["layer"], "extractor_id": path.stem,
            "C": top["C"], "val_accuracy": top["val_accuracy"], "val_set": val_set_id(rows)}
    head = to_head(refit(top), meta)
    save_head(head, paths.head)
    write_probe_report(paths.probe_report, meta, layers, table)
    write_sweep(paths.sweep, table)
    write_probe_metrics(paths.probe_metrics, meta)
    write_strategy(paths.strategy, decision)
    pooled_C = next((r["C"] for r in layers if r["layer"] == advice.POOLED), None)
    write_train_choice(paths.train_choice, TrainChoice(
        pooled_C, decision["plan"] if decision["carried_out"] else None))
    print(f"train: layer {top['layer']} (C={top['C']:g}), val accuracy "
          f"{top['val_accuracy']:.4f} -> {paths.head}", flush=True)
    print(f"train: advice: {decision['size']} and {decision['similarity']} -> "
          f"{decision['plan']}{'' if decision['carried_out'] else ' (advise.strategy: manual)'}",
          flush=True)
    return head
