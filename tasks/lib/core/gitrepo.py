"""The one door to git: every read or write of a git repository the project makes goes
through here (HEAD and whether tracked files differ from it, the commits that changed a file,
a file as committed at a revision, tags, `init`, `add` and `commit`). No git executable runs.

Built on scmrepo (DVC's own git layer, which GTO uses too): `scmrepo.git.Git` picks its
dulwich, pygit2 or GitPython backend per call (status, tags, init, add and commit go that
way). The history walk and the reads at a revision go to the libgit2 repository scmrepo's
pygit2 backend opened (`Git.pygit2.repo`): scmrepo has no call for the commits that changed
one path, and its file system at a revision costs ~1 ms a read. Measured on 60 commits (30 of
dvc.lock), the walk took 68 ms through dulwich and 1.7 ms through libgit2, the 60 reads
64 ms through scmrepo's file system and 1.6 ms through libgit2 (bench/git_history.py
compares the whole with one `git` process per read, as the project ran it before).

Paths are relative to the `root` a repository is opened at (a folder inside it, usually the
project's); revisions are what git accepts (`HEAD`, a tag, a hexsha). Every failure is one
TlflowError naming the repository and the operation.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType

from tlflow.tasks.lib.core.errors import TlflowError


@dataclass(frozen=True)
class Commit:
    """A commit as `tlflow history` lists it."""

    rev: str  # the full hexsha
    when: str  # the committer's time, ISO 8601 with its zone, as git's %cI prints it


def _iso(seconds: int, offset_minutes: int) -> str:
    zone = timezone(timedelta(minutes=offset_minutes))
    return datetime.fromtimestamp(seconds, zone).isoformat()


class GitRepo:
    """The git repository a folder lies in, open until `close()` (or the end of a `with`
    block: its packs stay open otherwise). Raises TlflowError "<root>: not a git repository"
    outside one."""

    def __init__(self, root: Path = Path()) -> None:
        from scmrepo.exceptions import SCMError
        from scmrepo.git import Git

        self.root = Path(root).resolve()
        try:
            self._scm = Git(os.fspath(self.root))
        except SCMError:
            raise TlflowError(f"{self.root}: not a git repository") from None
        self.top = Path(self._scm.root_dir).resolve()  # the repository's top folder

    def __enter__(self) -> GitRepo:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._scm.close()

    def _failed(self, what: str, why: object) -> TlflowError:
        return TlflowError(f"git {what} in {self.top}: {str(why) or type(why).__name__}")

    def name(self, path: str | Path) -> str:
        """`path` (relative to root) as git names it: relative to the top folder, with /."""
        return Path(os.path.relpath(self.root / path, self.top)).as_posix()

    @property
    def _lib(self):  # libgit2's repository (pygit2.Repository), as scmrepo opened it
        return self._scm.pygit2.repo

    # --- HEAD and the working tree ------------------------------------------------------

    def head(self) -> str | None:
        """HEAD's commit (full hexsha); None before the first commit."""
        return self._scm.get_ref("HEAD") or None

    def resolve(self, rev: str) -> str:
        """The commit (full hexsha) `rev` names: a hash or its prefix, a branch, a tag,
        HEAD~2... Raises TlflowError "<rev>: not a commit of the git repository at <root>"
        when it names none."""
        from scmrepo.exceptions import RevError, SCMError

        try:
            return self._scm.resolve_rev(rev)
        except (RevError, SCMError, ValueError):
            raise TlflowError(f"{rev}: not a commit of the git repository at "
                              f"{self.root}") from None

    def short(self, rev: str) -> str:
        """A commit's shortest unique abbreviation (7 characters or more), as `git rev-parse
        --short` prints it (libgit2's short_id)."""
        return str(self._lib.revparse_single(rev).short_id)

    def is_dirty(self) -> bool:
        """Whether a tracked file differs from HEAD, staged or not (untracked files do not
        count): `git status --porcelain --untracked-files=no` is not empty."""
        from scmrepo.exceptions import SCMError

        try:
            return bool(self._scm.is_dirty(untracked_files=False))
        except SCMError as err:
            raise self._failed("status", err) from None

    def changed(self, path: str) -> bool:
        """Whether the file `path` differs from HEAD: modified, staged, deleted, or there and
        not tracked (what `git status --porcelain -- PATH` lists; libgit2's status_file, which
        looks at that one file only)."""
        import pygit2

        try:
            flags = self._lib.status_file(self.name(path))
        except KeyError:  # neither in HEAD, nor in the index, nor on disk
            return False
        except pygit2.GitError as err:
            raise self._failed(f"status -- {path}", err) from None
        return flags not in (pygit2.enums.FileStatus.CURRENT, pygit2.enums.FileStatus.IGNORED)

    # --- history and files at a revision ------------------------------------------------

    def log(self, path: str) -> list[Commit]:
        """The commits reachable from HEAD that changed `path`, oldest first, each with its
        committer time; [] before the first commit. What `git log --reverse -- PATH` lists:
        git's default history simplification (a merge whose `path` equals a parent's is not
        listed and only that parent is followed), newest commit time first, then reversed."""
        head = self.head()
        if head is None:
            return []
        name = self.name(path)

        def blob(commit) -> object:
            try:
                return commit.tree[name].id
            except KeyError:
                return None

        repo, shown, seen = self._lib, [], {head}
        start = repo.get(head)
        todo = [(-start.commit_time, 0, start)]
        order = 1  # tie-break for equal times: the order commits were queued in
        while todo:
            _, _, c = heapq.heappop(todo)
            mine = blob(c)
            same = next((p for p in c.parents if blob(p) == mine), None)
            if same is None and (c.parents or mine is not None):
                shown.append(Commit(str(c.id), _iso(c.commit_time, c.commit_time_offset)))
            for p in ([same] if same is not None else c.parents):
                if str(p.id) not in seen:
                    seen.add(str(p.id))
                    heapq.heappush(todo, (-p.commit_time, order, p))
                    order += 1
        return shown[::-1]

    def show(self, rev: str, path: str) -> str | None:
        """The text of `path` as committed at `rev` (UTF-8); None when it was not there (or
        is a folder). Raises TlflowError for a revision git does not know."""
        import pygit2

        try:
            commit = self._lib.revparse_single(rev).peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError) as err:
            raise self._failed(f"show {rev}:{self.name(path)}", err) from None
        try:
            obj = commit.tree[self.name(path)]
        except KeyError:
            return None
        return obj.data.decode("utf-8") if isinstance(obj, pygit2.Blob) else None

    def exists_at(self, rev: str, path: str) -> bool:
        """Whether the file `path` is committed at `rev` (`git cat-file -e REV:PATH`)."""
        try:
            return self.show(rev, path) is not None
        except (TlflowError, UnicodeDecodeError):
            return False

    # --- tags ---------------------------------------------------------------------------

    def tags(self) -> list[str]:
        """Every tag's name, sorted (`git tag --list`)."""
        return list(self._scm.list_tags())

    def last_tag_time(self) -> int | None:
        """When the newest tag was made, in Unix seconds (an annotated tag's own time, a
        light tag's commit's), as `git for-each-ref --sort=-creatordate refs/tags` orders
        them; None without tags."""
        times = []
        for name in self._scm.list_tags():
            tag = self._scm.get_tag(name)
            if isinstance(tag, str):  # a light tag: the hexsha it names
                times.append(self._lib.get(tag).commit_time)
            elif tag is not None:
                times.append(tag.tag_time)
        return max(times, default=None)

    # --- writing ------------------------------------------------------------------------

    def add_commit(self, paths: Iterable[str], message: str) -> str:
        """Stage `paths` (relative to root; a folder adds what .gitignore leaves in it) and
        commit them with `message`, as `git add` and `git commit`; returns the new commit's
        hexsha. The identity is git's: GIT_AUTHOR_NAME/EMAIL, else user.name/email, else
        the system's user and host (dulwich's fallback)."""
        from scmrepo.exceptions import SCMError

        try:
            self._scm.add([os.fspath(self.root / p) for p in paths])
            self._scm.commit(message)
        except SCMError as err:
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise self._failed("commit", f"{err}{cause}") from None
        return self._scm.get_rev()

    @staticmethod
    def init(root: Path) -> None:
        """A new repository at `root` (`git init`)."""
        from scmrepo.git import Git

        try:
            Git.init(os.fspath(root)).close()
        except Exception as err:  # the backends' own errors vary (OSError, dulwich's)
            raise TlflowError(f"git init in {Path(root).resolve()}: {err}") from None


def toplevel(root: Path = Path()) -> Path | None:
    """The top folder of the repository `root` lies in; None outside one."""
    try:
        with GitRepo(root) as repo:
            return repo.top
    except TlflowError:
        return None


def _opened(root: Path) -> GitRepo | None:
    """The repository root lies in, open; None outside one."""
    try:
        return GitRepo(root)
    except TlflowError:
        return None


def revision(root: Path = Path()) -> str | None:
    """HEAD's short hash, with "-dirty" when a tracked file differs from it; None outside a
    repository or before the first commit."""
    if (repo := _opened(root)) is None:
        return None
    with repo:
        head = repo.head()
        return None if head is None else repo.short(head) + ("-dirty" if repo.is_dirty()
                                                              else "")


def commit_of(rev: str, root: Path = Path()) -> str | None:
    """The commit (full hexsha) `rev` names; None outside a repository or before the first
    commit. Raises TlflowError when the repository has commits but `rev` names none."""
    if (repo := _opened(root)) is None:
        return None
    with repo:
        return None if repo.head() is None else repo.resolve(rev)
