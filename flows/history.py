"""`tlflow history`: one line per versioned pipeline run, read from git's history of dvc.lock.

Nothing is logged on the side: every fact comes from what DVC recorded in dvc.lock at each
commit (the hashes of the manifest and the model, the params each stage ran with) and from
files those hashes name in the DVC cache (the manifest, the head's sidecar), plus the metrics
file committed with it. A run is versioned when its dvc.lock is committed.
"""

from __future__ import annotations

import csv
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.lib.errors import TlflowError
from tasks.lib.handoff import parse_eval_metrics
from tasks.lib.head import parse_meta
from tasks.lib.params import Params


@dataclass(frozen=True)
class Entry:
    """One versioned run."""

    rev: str
    when: str
    manifest: str | None
    images: frozenset[str] | None
    model: str | None
    head: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, Any]


def _git(*args: str, check: bool = True) -> str | None:
    """git's output; on failure an error, or None with check=False."""
    proc = subprocess.run(["git", *args], capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout
    if check:
        raise TlflowError(f"git {' '.join(args)}: {proc.stderr.strip() or 'failed'}")
    return None


def _show(rev: str, path: str) -> str | None:
    """A file as committed in rev; None when it was not there."""
    return _git("show", f"{rev}:{path}", check=False)


def _out_md5(lock: dict, stage: str, path: str) -> str | None:
    for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


def _dvc_read(path: str, rev: str) -> str | None:
    """A DVC-tracked file as of `rev`, through dvc.api (any cache dir, or the remote); None
    when neither the cache nor the remote still has it."""
    import dvc.api

    try:
        return dvc.api.read(path, repo=".", rev=rev)
    except Exception:  # DVC's errors for a missing cache entry or an unknown path vary
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


def entry(rev: str, when: str, params: Params) -> Entry:
    """What dvc.lock (and the files it names) say about the run committed at `rev`."""
    paths = params.base.paths
    lock = yaml.safe_load(_show(rev, "dvc.lock") or "{}") or {}
    manifest_md5 = _out_md5(lock, "ingest", str(paths.manifest))
    images = None
    if manifest_md5 and (text := _dvc_read(str(paths.manifest), rev)) is not None:
        images = frozenset(r["sha256"] for r in csv.DictReader(io.StringIO(text)))
    model_md5 = _out_md5(lock, "train", f"{paths.head}.safetensors")
    head_json = _dvc_read(f"{paths.head}.json", rev)
    head = parse_meta(head_json, f"{rev}:{paths.head}.json") if head_json else {}
    metrics_text = _show(rev, str(paths.eval_metrics))
    metrics = parse_eval_metrics(metrics_text, paths.eval_metrics) if metrics_text else {}
    return Entry(rev, when, manifest_md5, images, model_md5, head, _params(lock), metrics)


def entries(params: Params) -> list[Entry]:
    """Every commit that changed dvc.lock, oldest first."""
    log = _git("log", "--reverse", "--format=%h %cI", "--", "dvc.lock").split("\n")
    return [entry(*line.split(" ", 1), params) for line in log if line.strip()]


def lines(history: list[Entry]) -> list[str]:
    """One line per run: when, rev, data version and change, extractor, model, params, metrics."""
    out, before = [], None
    for e in history:
        data = f"data {e.manifest[:8] if e.manifest else '?'}"
        if e.images is not None:
            if before is not None and before.images is not None:
                added, removed = len(e.images - before.images), len(before.images - e.images)
                data += f" (+{added} -{removed}, {len(e.images)} images)"
            else:
                data += f" ({len(e.images)} images)"
        changed = "first run" if before is None else ", ".join(
            f"{k}={v}" for k, v in sorted(e.params.items()) if before.params.get(k) != v
        ) or "no params changed"
        probe = e.metrics.get("probe", {})
        metric = f"test acc {probe['accuracy']:.4f}" if "accuracy" in probe else "test acc ?"
        out.append(f"{e.when[:19]}  {e.rev}  {data}  extractor "
                   f"{e.head.get('extractor_id', '?')}  model {(e.model or '?')[:8]}  "
                   f"{metric}  params: {changed}")
        before = e
    return out


def run(params: Params) -> list[str]:
    if not Path(".git").exists():
        raise TlflowError("tlflow history reads git's history of dvc.lock; this is no git "
                          "repository (git init, then commit dvc.lock after runs)")
    history = entries(params)
    if not history:
        raise TlflowError("dvc.lock has never been committed: commit it (with params.yaml and "
                          "metrics/) after a run to version that run")
    return lines(history)
