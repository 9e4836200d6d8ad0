"""Advise: place the data set in the notes' 2x2 table from measurements, now, and name the
plan (tasks/lib/advice.py). Read-only: it uses the manifest, train's layer sweep and the
store, plus the backbone's own ImageNet classifier for a reported (unused) confidence."""

from __future__ import annotations

from typing import Any

from tlflow.tasks.lib import advice
from tlflow.tasks.lib.handoff import chosen_store, read_extract_report, read_probe_report
from tlflow.tasks.lib.manifest import read_manifest, without
from tlflow.tasks.lib.params import Params

PARAMS = ("base.seed", "extract.backbone", "extract.weights", "advise")


def _classifier(params: Params, best: dict[str, Any]) -> advice.Classifier | None:
    """The ImageNet classifier of the backbone the probe was trained on (extract.compare's
    winner; extract.backbone for a probe from before it); None when its weights are random."""
    name = best.get("backbone", params.extract.backbone)
    weights = best.get("weights", params.extract.weights)
    if weights == "none":
        return None
    from tlflow.tasks.lib.backbones import create_backbone

    clf = create_backbone(name, weights, None, params.base.seed).classifier
    return clf.weight.detach().numpy(), clf.bias.detach().numpy()


def run(params: Params) -> dict[str, Any]:
    """The decision as JSON (size, similarity, plan, evidence)."""
    paths = params.base.paths
    rows = without(read_manifest(paths.manifest), read_extract_report(paths.extract_report).bad)
    probe = read_probe_report(paths.probe_report)
    store = chosen_store(paths.features, probe["best"]["extractor_id"], paths.probe_report)
    decision = advice.measure(store, rows, probe["layers"], params.advise,
                              params.base.seed, _classifier(params, probe["best"]))
    return decision.as_json()
