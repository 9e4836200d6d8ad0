"""The pipeline's stages in order, and their freshness as DVC's dvc.lock records it."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tlflow.tasks.lib.core.codedeps import STAGES, STAMP, describe_change, read_stamp, refresh_stamp
from tlflow.tasks.lib.core.params import Params
from tlflow.tasks.lib.core.scope import scoped


def stage_runner(name: str) -> Callable[[Params], object]:
    """The `run` shell of tasks/<name>.py (imported lazily: torch is slow to import), given
    only the params the stage declares (its PARAMS, which dvc.yaml lists)."""
    if name not in STAGES:
        from tlflow.tasks.lib.core.errors import TlflowError

        raise TlflowError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    module = importlib.import_module(f"tlflow.tasks.{name}")

    def run(params: Params) -> object:
        # each stage refuses a folder of someone else's files before it writes anything
        # (tlflow.tasks.lib.data.ownership), so a direct call of its run is as safe
        return module.run(scoped(params, module.PARAMS))

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
        from tlflow.tasks.lib.core.errors import TlflowError

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

    from tlflow.tasks.lib.core import interrupts

    dvc_log = logging.getLogger(dvc.__name__)
    level = dvc_log.level
    dvc_log.setLevel(max(level, logging.WARNING))  # "Updating lock file": not on stdout
    try:
        with interrupts.held(), _dvc(root) as repo:
            repo.commit(name, force=True)
    finally:
        dvc_log.setLevel(level)


def check_project() -> Params:
    """The project's params, once it is known to be a DVC project: bad params and a missing
    .dvc or dvc.yaml stop here (a TlflowError, exit 2), before Prefect starts."""
    from tlflow.tasks.lib.core.errors import TlflowError
    from tlflow.tasks.lib.core.params import load_params

    params = load_params()
    for needed in (".dvc", "dvc.yaml"):
        if not Path(needed).exists():
            raise TlflowError(f"{needed}: not found; tlflow needs a DVC project (`tlflow "
                              "init` makes this folder one)")
    return params


def bring_up_to_date(names: Sequence[str], params: Params, who: str) -> None:
    """Run those of the stages `who` reads that are stale, in order, and record them in
    dvc.lock, as `dvc repro` (and `tlflow run`) would: a folder or CSV source is rescanned
    (DVC cannot see it), and what follows reruns only if what it reads changed. Their output
    goes to stderr, so stdout keeps only `who`'s answer. Outside a DVC project nothing can be
    checked: one line on stderr says so."""
    if not Path(".dvc").is_dir():
        print(f"{who}: no DVC project here (.dvc), so whether {', '.join(names)} are up to date "
              "is not known; the answer describes the data they last ran on", file=sys.stderr)
        return
    for name in names:
        reason = why_stale(name) or rescanned(name, params)
        if reason is None:
            continue
        print(f"{who}: bringing {name} up to date first ({reason})", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # the stage's own lines
            stage_runner(name)(params)
        commit(name)


def warn_if_stale(names: Sequence[str], who: str) -> None:
    """Say on stderr which of these stages DVC calls stale: what `who` reports then describes
    their last run, not the data and params as they are now. Silent outside a DVC project."""
    from tlflow.tasks.lib.core.errors import TlflowError

    if not Path(".dvc").is_dir():
        return
    try:
        report = status()
    except TlflowError as err:  # e.g. no git: freshness cannot be told
        print(f"{who}: whether {', '.join(names)} are up to date is not known ({err})",
              file=sys.stderr)
        return
    for name in names:
        if report.get(name):
            print(f"{who}: stage {name} is stale ({report[name]}): this describes its last "
                  "run; `tlflow run` brings it up to date", file=sys.stderr)


def prune_features(params: Params, dry_run: bool) -> list[tuple[Path, int, int]]:
    """Prune every feature store of rows the manifest no longer references (`tlflow features
    gc`): (store, rows kept, rows removed or that would be) for each. When extract was up to
    date before, dvc.lock records the pruned stores, so it stays up to date.

    Raises TlflowError when base.paths.features is not tlflow's folder (gc rewrites every
    store in it) or the manifest cannot be read."""
    from tlflow.tasks.lib.data import ownership
    from tlflow.tasks.lib.data.manifest import read_manifest
    from tlflow.tasks.lib.features.store import gc

    paths = params.base.paths
    in_dvc = Path(".dvc").is_dir()
    was_fresh = in_dvc and why_stale("extract") is None
    ownership.check("features", paths.features, ownership.recognised("features"))
    keep = {r.sha256 for r in read_manifest(paths.manifest)}
    pruned = list(gc(paths.features, keep, params.extract.lock_timeout, dry_run))
    if was_fresh and not dry_run:
        commit("extract")
    return pruned
