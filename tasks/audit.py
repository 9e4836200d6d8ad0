"""Audit: data checks from the cached codes, after train (no forward pass). Near-copies of
train images in val and test, one file under two labels, the same bytes under several names
(reports/duplicates.json), likely
label errors on train + val (reports/label_issues.json), images per class and split
(reports/balance.json), and their counts (metrics/audit.json). They inform: the data and the
models stay as they are (tasks/lib/assess/audit.py)."""

from __future__ import annotations

from tlflow.tasks.lib.assess import audit
from tlflow.tasks.lib.core.handoff.audit import (
    Balance,
    Duplicates,
    LabelIssues,
    write_audit_metrics,
)
from tlflow.tasks.lib.core.handoff.extract import ExtractReport, chosen_store
from tlflow.tasks.lib.core.handoff.train import ProbeReport
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.data.manifest import read_manifest, without
from tlflow.tasks.lib.features.store import FeatureStore

# what this stage reads besides base.paths (dvc.yaml: params): the probe protocol the
# out-of-fold probabilities follow, and its own thresholds
PARAMS = ("base.seed", "train.C_grid", "train.normalize", "train.max_iter",
          "train.class_weight", "audit")

DUPLICATE_LAYER = "pooled"  # the codes near-copies are compared on, when the store has them


def run(params: Params) -> dict[str, int]:
    """Run the checks; write the three summaries and the counts; return the counts."""
    paths, cfg, seed = params.base.paths, params.audit, params.base.seed
    all_rows = read_manifest(paths.manifest)
    rows = without(all_rows, ExtractReport.read(paths.extract_report).bad)
    best = ProbeReport.read(paths.probe_report).best
    fit_rows = [r for r in rows if r.split in ("train", "val")]
    path = chosen_store(paths.features, best.extractor_id, paths.probe_report)
    with FeatureStore(path) as store:
        dup_layer = DUPLICATE_LAYER if DUPLICATE_LAYER in store.layers else best.layer
        keys = sorted({r.sha256 for r in rows})
        codes = dict(zip(keys, store.read(dup_layer, keys), strict=True))
        x_fit = store.read(best.layer, [r.sha256 for r in fit_rows])
    dups = audit.near_duplicates(codes, rows, cfg.duplicate_threshold, cfg.max_listed)
    conflicts = audit.label_conflicts(all_rows, cfg.max_listed)
    same = audit.identical_files(all_rows, cfg.max_listed)
    probe = audit.ProbeSetting(best.layer, tuple(params.train.C_grid), params.train.normalize,
                               params.train.max_iter, params.train.class_weight)
    issues = audit.label_issues(fit_rows, x_fit, probe, cfg.folds, seed, cfg.max_listed)
    Duplicates(threshold=dups["threshold"], layer=dup_layer, near_duplicates=dups,
               label_conflicts=conflicts, identical_files=same).write(paths.duplicates)
    LabelIssues.model_validate(issues).write(paths.label_issues)
    Balance.model_validate(audit.balance(rows)).write(paths.balance)
    counts = {"near_duplicates": dups["count"], "label_conflicts": conflicts["count"],
              "label_issues": issues["count"], "identical_files": same["files"]}
    write_audit_metrics(paths.audit_metrics, counts)
    print(f"audit: {dups['count']} near-duplicate pair(s) across splits (similarity >= "
          f"{dups['threshold']} on {dup_layer}), {conflicts['count']} file(s) under two "
          f"labels, {same['files']} file(s) with a copy under another name, "
          f"{issues['count']} likely label error(s) among {len(fit_rows)} train + val "
          f"images -> {paths.duplicates}, {paths.label_issues}", flush=True)
    return counts
