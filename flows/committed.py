"""The run committed at a git revision, as the report compares with it: its test metrics,
per-class table, per-image predictions and manifest, read through DVC at that revision
(dvc.api.DVCFileSystem: files in git as committed there, DVC-tracked ones such as the
manifest from the DVC cache or the remote), and parsed by their one reader each.

Nothing here fails on what an older project lacks: a file missing at the revision (a run
from before evaluate wrote per-image predictions, no committed run yet, a manifest no longer
in any cache) becomes a note the report shows. Only a revision that names no commit, when the
user named it, is an error.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.evaluate import (
    ClassScores,
    EvalMetrics,
    ImagePrediction,
    PerClass,
    Predictions,
    Scores,
)
from tlflow.tasks.lib.core.paths import Paths
from tlflow.tasks.lib.data.manifest import Row, read_manifest

T = TypeVar("T")
NO_RUN = "no committed run to compare with"


@dataclass(frozen=True)
class Committed:
    """What the run committed at `rev` left; None for each file it lacks, and why in notes."""

    rev: str  # as the user named it (HEAD by default)
    sha: str | None  # the commit it names; None without one
    metrics: dict[str, Scores] = field(default_factory=dict)  # by model
    per_class: tuple[ClassScores, ...] | None = None
    predictions: tuple[ImagePrediction, ...] | None = None
    manifest: list[Row] | None = None
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """How the report names it: "HEAD (1a2b3c4)", or "1a2b3c4" for a commit named by
        its hash."""
        return _label(self.rev, self.sha) + (
            f" ({self.sha[:7]})" if self.sha and not self.sha.startswith(self.rev) else "")


def _label(rev: str, sha: str | None) -> str:
    """rev as notes name it: a commit's hash shortened to 7 characters."""
    return sha[:7] if sha and sha.startswith(rev) else rev


def resolve(root: Path, rev: str) -> str | None:
    """The commit `rev` names in the git repository at root; None when root is no git
    repository or has no commit yet (tlflow.tasks.lib.core.gitrepo.commit_of)."""
    from tlflow.tasks.lib.core.gitrepo import commit_of

    return commit_of(rev, root)


def _inside(root: Path, path: Path) -> str | None:
    """path relative to root, as DVC names it; None when it lies outside the project."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def read_committed(root: Path, paths: Paths, rev: str = "HEAD", named: bool = False,
                   ) -> Committed:
    """The run committed at `rev` in the project at root. `named`: the user named rev
    (`--against`), so a revision that names no commit is an error (TlflowError: exit 2);
    otherwise it, like every file missing there, is a note."""
    try:
        sha = resolve(root, rev)
    except TlflowError:
        if named:
            raise
        return Committed(rev, None, notes=(f"{NO_RUN} ({rev} names no commit)",))
    if sha is None:
        if named:
            raise TlflowError(f"{rev}: not a commit (no git repository with a commit at "
                              f"{root.resolve()})")
        return Committed(rev, None, notes=(f"{NO_RUN} (no git commit yet)",))
    rels = {p: _inside(root, p) for p in (paths.eval_metrics, paths.per_class,
                                         paths.predictions, paths.manifest)}
    if None in rels.values():
        return Committed(rev, sha, notes=(f"{NO_RUN} (the project's paths lie outside "
                                          f"{root.resolve()})",))
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(root), rev=sha)
    except Exception as err:  # DVC's errors for a repo it cannot open vary
        return Committed(rev, sha, notes=(f"{NO_RUN} ({rev} is no DVC project: "
                                          f"{type(err).__name__})",))
    with tempfile.TemporaryDirectory(prefix="tlflow-committed-") as tmp:
        got = _Reader(fs, Path(tmp), _label(rev, sha))
        text = got.text(rels[paths.eval_metrics])
        metrics = EvalMetrics.parse(text, paths.eval_metrics).models() if text else {}
        if not text:
            got.notes.insert(0, f"{NO_RUN} ({got.rev} has no "
                                f"{rels[paths.eval_metrics]})")
        return Committed(
            rev, sha, metrics,
            got.parsed(rels[paths.per_class], lambda p: PerClass.read(p).rows,
                       "per-class table"),
            got.parsed(rels[paths.predictions], lambda p: Predictions.read(p).rows,
                       "per-image predictions"),
            got.parsed(rels[paths.manifest], read_manifest, "manifest"),
            tuple(got.notes))


class _Reader:
    """Reads files of one revision, each missing or unreadable one noted."""

    def __init__(self, fs: Any, tmp: Path, rev: str) -> None:
        self.fs, self.tmp, self.rev = fs, tmp, rev
        self.notes: list[str] = []

    def text(self, rel: str) -> str | None:
        """The file's text at the revision; None when it was not there or cannot be read."""
        try:
            return self.fs.read_text(rel, encoding="utf-8")
        except FileNotFoundError:
            return None
        except Exception as err:  # e.g. a DVC-tracked file in no cache
            self.notes.append(f"{rel} at {self.rev}: cannot read it through DVC "
                              f"({type(err).__name__}); `dvc pull` it?")
            return None

    def parsed(self, rel: str, reader: Callable[[Path], T], what: str) -> T | None:
        """The file parsed by its one reader (given a copy in tmp); None, and a note, when
        the revision lacks it or it does not parse."""
        text = self.text(rel)
        if text is None:
            if not any(n.startswith(f"{rel} at") for n in self.notes):
                self.notes.append(f"{self.rev} has no {what} ({rel})")
            return None
        copy = self.tmp / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text, encoding="utf-8")
        try:
            return reader(copy)
        except TlflowError as err:
            self.notes.append(f"{rel} at {self.rev}: not readable "
                              f"({str(err).split(': ', 1)[-1]})")
            return None
