"""Advise: place the data set in the notes' 2x2 table from measurements, now, and name the
plan (tasks/lib/strategy.py). Read-only: it uses the manifest, train's layer sweep and the
store, plus the backbone's own ImageNet classifier for a reported (unused) confidence."""

from __future__ import annotations

from tlflow.tasks.lib.core.handoff.extract import ExtractReport, chosen_store
from tlflow.tasks.lib.core.handoff.train import ProbeChoice, ProbeReport, Strategy
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.data.manifest import read_manifest, without
from tlflow.tasks.lib.probe import strategy

PARAMS = ("base.seed", "extract.backbone", "extract.weights", "advise")


def _classifier(params: Params, best: ProbeChoice) -> strategy.Classifier | None:
    """The ImageNet classifier of the backbone the probe was trained on (extract.compare's
    winner; extract.backbone for a probe from before it); None when its weights are random."""
    name = best.backbone or params.extract.backbone
    weights = best.weights or params.extract.weights
    if weights == "none":
        return None
    from tlflow.tasks.lib.features.backbones import create_backbone

    clf = create_backbone(name, weights, None, params.base.seed).classifier
    return clf.weight.detach().numpy(), clf.bias.detach().numpy()


def run(params: Params) -> Strategy:
    """The decision (size, similarity, plan, the evidence), measured now."""
    paths = params.base.paths
    rows = without(read_manifest(paths.manifest), ExtractReport.read(paths.extract_report).bad)
    probe = ProbeReport.read(paths.probe_report)
    store = chosen_store(paths.features, probe.best.extractor_id, paths.probe_report)
    return strategy.measure(store, rows, probe.layers, params.advise, params.base.seed,
                          _classifier(params, probe.best))
