"""The pipeline's stages in order, and their freshness as DVC's dvc.lock records it."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tlflow.tasks.lib.codedeps import STAGES, STAMP, describe_change, read_stamp, refresh_stamp
from tlflow.tasks.lib.params import Params, scoped


def stage_runner(name: str) -> Callable[[Params], object]:
    """The `run` shell of tasks/<name>.py (imported lazily: torch is slow to import), given
    only the params the stage declares (its PARAMS, which dvc.yaml lists)."""
    if name not in STAGES:
        from tlflow.tasks.lib.errors import TlflowError

        raise TlflowError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    module = importlib.import_module(f"tlflow.tasks.{name}")

    def run(params: Params) -> object:
        # a folder of someone else's files is refused before the stage writes anything
        from tlflow.tasks.lib import ownership

        ownership.check_outputs(name, params.base.paths)
        result = module.run(scoped(params, module.PARAMS))
        ownership.mark_outputs(name, params.base.paths)
        return result

    return run


@contextlib.contextmanager
def _dvc(root: Path) -> Iterator[object]:
    """DVC's Repo at root; DVC's own failures (no git, a broken dvc.lock...) become one line
    naming what is wrong and what to do (a TlflowError: exit 2, never retried). The code
    stamp (tlflow-code.yaml) is refreshed first, so DVC sees the tlflow code installed now."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    refresh_stamp(root)
    try:
        with Repo(str(root)) as repo:
            yield repo
    except DvcException as err:
        from tlflow.tasks.lib.errors import TlflowError

        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if "is not a git repository" in text:
            hint = ("; tlflow versions runs with git: run `git init` here (or `dvc init -f "
                    "--no-scm` for a project without git)")
        raise TlflowError(f"dvc: {text}{hint}") from None


dvc_repo = _dvc  # the same, for the modules that read DVC's plots (flows/dvc_plots.py)


def rescanned(name: str, params: Params) -> str | None:
    """Folder and CSV sources live outside DVC: ingest rescans them on every run (the stat
    cache makes that cheap) and the stages after it rerun only if the manifest changed."""
    if name != "ingest":
        return None
    source = params.ingest.source
    return f"{source} source rescanned" if source in ("folder", "csv") else None


def why_stale(name: str, root: Path = Path()) -> str | None:
    """Why DVC considers the stage stale (as `dvc status` says), or None when up to date."""
    with _dvc(root) as repo:
        return _never_run(repo, name) or _reason(repo, repo.status(targets=[name]), name)


def status(root: Path = Path()) -> dict[str, str | None]:
    """Every stage's staleness as one `dvc status` reports it (None: up to date)."""
    with _dvc(root) as repo:
        report = repo.status()
        return {name: _never_run(repo, name) or _reason(repo, report, name) for name in STAGES}


def _never_run(repo: object, name: str) -> str | None:
    """"never run" when dvc.lock records nothing of the stage (no dep or out hashed): DVC's
    own report would list every dependency as changed."""
    stage = next((s for s in repo.index.stages if s.name == name), None)  # type: ignore[attr-defined]
    if stage is None or any(x.hash_info for x in (*stage.deps, *stage.outs)):
        return None
    return "never run (no dvc.lock entry)"


def _reason(repo: object, report: dict, name: str) -> str | None:
    """One stage's entry of a `dvc status` report, compacted (None: up to date)."""
    changes = report.get(f"dvc.yaml:{name}") or report.get(name)
    if not changes:
        return None
    return "; ".join(_describe(c, lambda: _code_change(repo, name)) for c in changes)


def _code_change(repo: object, name: str) -> str:
    """What changed in the stage's code entry of the stamp, against what dvc.lock records."""
    stage = next(s for s in repo.index.stages if s.name == name)  # type: ignore[attr-defined]
    dep = next((d for d in stage.deps if hasattr(d, "params") and d.def_path == STAMP), None)
    was = dep.hash_info.value.get(name) if dep is not None and dep.hash_info else None
    now = read_stamp(Path(repo.root_dir) / STAMP).get(name)  # type: ignore[attr-defined]
    return describe_change(name, was, now)


def _describe(change: object, code_change: Callable[[], str]) -> str:
    """Compact reason from one `dvc status` entry, e.g. "params: train.C_grid; deps: data/x";
    a change of the code stamp reads "tlflow's extract code changed (0.1.0 → 0.2.0)"."""
    if isinstance(change, str):  # e.g. "changed command", "always changed"
        return change
    parts = []
    for kind, items in change.items():  # {"changed deps": {"params.yaml": {...}, "a.py": ...}}
        what = kind.removeprefix("changed ")
        if not isinstance(items, dict):
            parts.append(f"{what}: {items}")
            continue
        if isinstance(items.get(STAMP), dict):
            parts.append(code_change())
            items = {k: v for k, v in items.items() if k != STAMP}
        params = [key for v in items.values() if isinstance(v, dict) for key in v]
        paths = [p for p, v in items.items() if not isinstance(v, dict)]
        if params:
            parts.append(f"params: {', '.join(params)}")
        if paths:
            parts.append(f"{what}: {', '.join(paths)}")
    return "; ".join(parts)


def commit(name: str, root: Path = Path()) -> None:
    """Record the stage's deps, params and outs in dvc.lock (and its outs in the cache). A
    first SIGINT or SIGTERM is held off until the record is written: DVC rewrites dvc.lock
    in place, and a lock cut half-way makes the next run fail its validation."""
    import logging

    import dvc  # first: importing it sets up its logger, which would undo the level below

    from tlflow.tasks.lib import interrupts

    dvc_log = logging.getLogger(dvc.__name__)
    level = dvc_log.level
    dvc_log.setLevel(max(level, logging.WARNING))  # "Updating lock file": not on stdout
    try:
        with interrupts.held(), _dvc(root) as repo:
            repo.commit(name, force=True)
    finally:
        dvc_log.setLevel(level)
