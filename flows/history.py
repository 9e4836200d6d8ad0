"""`tlflow history`: one line per versioned pipeline run, read from git's history of dvc.lock.

Nothing is logged on the side: every fact comes from what DVC recorded in dvc.lock at each
commit (the hashes of the manifest and the model, the params each stage ran with) and from
files those hashes name in the DVC cache (the manifest, the head's sidecar), plus the metrics
file committed with it, and the GTO tags (versions and stages) that name its commit. A run is
versioned when its dvc.lock is committed.

A data version has one name everywhere (history, the run summary, the flow run's tags): DVC's
md5 of the manifest as dvc.lock records it, shortened to `DATA_VERSION_LEN` characters.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.gitrepo import GitRepo, toplevel
from tlflow.tasks.lib.core.handoff.evaluate import EvalMetrics, Scores
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.core.paths import Paths
from tlflow.tasks.lib.models.registry import read_at
from tlflow.tasks.lib.probe.head import HeadSidecar, parse_meta

DATA_VERSION_LEN = 8
LOCK = "dvc.lock"


@dataclass(frozen=True)
class Entry:
    """One versioned run."""

    rev: str
    when: str  # ISO 8601 with the zone, as git prints it (%cI)
    manifest: str | None
    images: frozenset[str] | None
    model: str | None
    head: HeadSidecar | None  # the head's sidecar at that commit; None without one
    params: dict[str, Any]
    metrics: dict[str, Scores]  # by model: probe, finetune
    promotions: tuple[str, ...] = ()  # GTO: "probe v0.0.2 (prod)" for versions at this commit


def data_version(manifest_md5: str | None) -> str | None:
    """The data version's one name: DVC's md5 of the manifest, shortened."""
    return manifest_md5[:DATA_VERSION_LEN] if manifest_md5 else None


def current_data_version(paths: Paths, root: Path = Path()) -> str | None:
    """The data version dvc.lock records now (None before ingest was first recorded)."""
    lock_file = root / LOCK
    if not lock_file.is_file():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return data_version(_out_md5(lock, "ingest", paths.manifest.as_posix()))


def _out_md5(lock: dict, stage: str, path: str) -> str | None:
    for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


def _dvc_read(path: str, rev: str) -> str | None:
    """A DVC-tracked file as of `rev` (registry.read_at: any cache dir, or the remote); None
    when neither still has it."""
    try:
        return str(read_at(Path(), path, rev))
    except TlflowError:
        return None


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def _params(lock: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in lock.get("stages", {}).values():
        _flat("", stage.get("params", {}).get("params.yaml", {}), out)
    return out


def entry(repo: GitRepo, rev: str, when: str, params: Params,
          promotions: dict[str, tuple[str, ...]] | None = None) -> Entry:
    """What dvc.lock (and the files it names) say about the run committed at `rev`."""
    paths = params.base.paths
    lock = yaml.safe_load(repo.show(rev, LOCK) or "{}") or {}
    manifest_md5 = _out_md5(lock, "ingest", paths.manifest.as_posix())
    images = None
    if manifest_md5 and (text := _dvc_read(str(paths.manifest), rev)) is not None:
        images = frozenset(r["sha256"] for r in csv.DictReader(io.StringIO(text)))
    model_md5 = _out_md5(lock, "train", f"{paths.head}.safetensors")
    head_json = _dvc_read(f"{paths.head}.json", rev)
    head = parse_meta(head_json, f"{rev}:{paths.head}.json") if head_json else None
    metrics_text = repo.show(rev, paths.eval_metrics.as_posix())
    metrics = EvalMetrics.parse(metrics_text, paths.eval_metrics).models() if metrics_text \
        else {}
    return Entry(rev, when, manifest_md5, images, model_md5, head, _params(lock), metrics,
                 (promotions or {}).get(rev, ()))


def promotions(root: Path = Path()) -> dict[str, tuple[str, ...]]:
    """GTO's registry by commit: "probe v0.0.2 (prod)" for each version registered there, with
    the stages it is assigned to now. Empty without tags (GTO is not even imported)."""
    with GitRepo(root) as repo:
        if not repo.tags():
            return {}
    import gto.api
    from gto.exceptions import GTOException
    from scmrepo.exceptions import SCMError

    from tlflow.tasks.lib.models.registry import ARTIFACTS

    found: dict[str, list[str]] = {}
    for name in ARTIFACTS:
        try:
            versions = gto.api.show(str(root), name)
        except (GTOException, SCMError):  # no version of it yet
            continue
        for v in versions:
            if not v.get("registrations"):  # a commit GTO merely discovered, not a version
                continue
            stages = sorted({s["stage"] for s in v.get("stages", [])})
            found.setdefault(v["commit_hexsha"], []).append(
                f"{name} {v['version']}" + (f" ({', '.join(stages)})" if stages else ""))
    return {rev: tuple(sorted(labels)) for rev, labels in found.items()}


def entries(params: Params) -> list[Entry]:
    """Every commit that changed dvc.lock, oldest first."""
    registry = promotions()
    with GitRepo() as repo:
        return [entry(repo, c.rev, c.when, params, registry) for c in repo.log(LOCK)]


def records(history: list[Entry]) -> list[dict[str, Any]]:
    """One record per run (what `tlflow history --json` prints): when, revision, data version
    and its change, extractor, model, test accuracies, promotions, the params that changed."""
    out, before = [], None
    for e in history:
        images = None if e.images is None else len(e.images)
        known = before is not None and before.images is not None and e.images is not None
        changed = None if before is None else {
            k: v for k, v in sorted(e.params.items()) if before.params.get(k) != v}
        out.append({
            "when": e.when, "rev": e.rev[:7], "data_version": data_version(e.manifest),
            "images": images,
            "images_added": len(e.images - before.images) if known else None,
            "images_removed": len(before.images - e.images) if known else None,
            "extractor_id": e.head.extractor_id if e.head else None,
            "model": e.model[:DATA_VERSION_LEN] if e.model else None,
            "probe_accuracy": e.metrics["probe"].accuracy if "probe" in e.metrics else None,
            "finetune_accuracy": e.metrics["finetune"].accuracy if "finetune" in e.metrics
            else None,
            "promotions": list(e.promotions), "params_changed": changed,
        })
        before = e
    return out


HEADER = ("when", "rev", "data", "images", "extractor", "model", "probe", "finetune",
          "promoted", "params changed")
WIDTH = 120  # columns `tlflow history` fits its lines in
OPTIONAL = ("finetune", "promoted")  # columns left out when no run has a value in them
MIN_WRAP = 24  # the params column narrower than this: they go on lines of their own


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    images = "?" if r["images"] is None else str(r["images"])
    if r["images_added"] is not None:
        images += f" (+{r['images_added']} -{r['images_removed']})"
    changed = r["params_changed"]
    params = "first run" if changed is None else (
        ", ".join(f"{k}={v}" for k, v in changed.items()) or "none")
    extractor = (r["extractor_id"] or "?")[:DATA_VERSION_LEN]  # in full in --json
    return (r["when"], r["rev"], r["data_version"] or "?", images, extractor,
            r["model"] or "?", acc(r["probe_accuracy"]), acc(r["finetune_accuracy"]),
            ", ".join(r["promotions"]) or "-", params)


def lines(history: list[Entry], width: int = WIDTH) -> list[str]:
    """A header, then one aligned line per run, within `width` columns: the columns no run
    fills (finetune, promoted) are left out, and the params that changed, last, wrap under
    their own column (or, where they do not fit a column narrower than MIN_WRAP, on indented
    lines of their own). `--json` has everything in full."""
    rows = [HEADER, *(_cells(r) for r in records(history))]
    keep = [i for i, name in enumerate(HEADER)
            if name not in OPTIONAL or any(row[i] != "-" for row in rows[1:])]
    rows = [tuple(row[i] for i in keep) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(keep) - 1)]
    start = sum(widths) + 2 * len(widths)  # where the last column begins
    room = width - start
    out = []
    for row in rows:
        fixed = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        if len(row[-1]) <= room or room >= MIN_WRAP:
            first, *more = textwrap.wrap(row[-1], room, break_on_hyphens=False) or [""]
            out += [f"{fixed}  {first}", *(" " * start + m for m in more)]
        else:
            out += [fixed.rstrip(), *("    " + m for m in textwrap.wrap(
                row[-1], width - 4, break_on_hyphens=False))]
    return out


def run(params: Params, as_json: bool = False) -> list[str]:
    """The lines `tlflow history` prints (a header first), or one JSON document."""
    if toplevel() is None:
        raise TlflowError("tlflow history reads git's history of dvc.lock; this is no git "
                          "repository (git init, then commit dvc.lock after runs)")
    history = entries(params)
    if not history:
        raise TlflowError("dvc.lock has never been committed: commit it (with params.yaml and "
                          "metrics/) after a run to version that run")
    return [json.dumps(records(history), indent=2)] if as_json else lines(history)
