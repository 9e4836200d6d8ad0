"""The pipeline's stages in order, and their freshness as DVC's dvc.lock records it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from tasks.params import Params

STAGES = ("ingest", "extract", "train", "evaluate")


def stage_runner(name: str) -> Callable[[Params], object]:
    """The `run` shell of tasks/<name>.py (imported lazily: torch is slow to import)."""
    if name not in STAGES:
        from tasks.errors import TlflowError

        raise TlflowError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    return importlib.import_module(f"tasks.{name}").run


def why_stale(name: str, root: Path = Path()) -> str | None:
    """Why DVC considers the stage stale (as `dvc status` says), or None when up to date."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=[name])
    changes = status.get(f"dvc.yaml:{name}") or status.get(name)
    if not changes:
        return None
    return "; ".join(_describe(c) for c in changes)


def _describe(change: object) -> str:
    if isinstance(change, str):
        return change
    parts = []
    for kind, items in change.items():  # e.g. {"changed deps": {"params.yaml": {...}}}
        if isinstance(items, dict):
            detail = ", ".join(
                f"{p} ({', '.join(v) if isinstance(v, dict) else v})" for p, v in items.items()
            )
        else:
            detail = str(items)
        parts.append(f"{kind}: {detail}")
    return "; ".join(parts)


def commit(name: str, root: Path = Path()) -> None:
    """Record the stage's deps, params and outs in dvc.lock (and its outs in the cache)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(name, force=True)
