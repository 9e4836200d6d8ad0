"""tasks/lib/core/gitrepo.py, the one door to git, against git's own answers on small repositories
(git itself builds them and is asked the same questions)."""

import os
import subprocess
from pathlib import Path

import pytest

from tlflow.tasks.lib.core import gitrepo
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.gitrepo import GitRepo

ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
      "GIT_COMMITTER_EMAIL": "t@t"}


def git(root: Path, *args: str, **env: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True, env={**os.environ, **ID, **env}).stdout


def commit(root: Path, files: dict[str, str], message: str, when: str) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root, "add", *files)
    git(root, "commit", "-qm", message, GIT_AUTHOR_DATE=when, GIT_COMMITTER_DATE=when)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """dvc.lock changed on main and on a side branch; merges that keep either side, a merge
    of a branch that left dvc.lock alone; commit times in three zones; light and annotated
    tags."""
    root = tmp_path_factory.mktemp("repo")
    git(root, "init", "-q", "-b", "main")
    commit(root, {"params.yaml": "a: 1\n"}, "no lock yet", "2026-01-01T10:00:00+00:00")
    commit(root, {"dvc.lock": "1\n", "metrics/eval.json": '{"a": 1}\n'}, "run 1",
           "2026-01-02T10:00:00+05:30")
    git(root, "checkout", "-qb", "side")
    commit(root, {"dvc.lock": "side\n"}, "side run (its lock is taken)",
           "2026-01-03T10:00:00-08:00")
    git(root, "checkout", "-q", "main")
    commit(root, {"params.yaml": "a: 2\n"}, "main, lock alone", "2026-01-04T10:00:00+00:00")
    git(root, "merge", "-q", "--no-edit", "side", GIT_COMMITTER_DATE="2026-01-05T10:00:00Z")
    git(root, "checkout", "-qb", "other", "HEAD~1")
    commit(root, {"dvc.lock": "dropped\n"}, "a lock the merge drops",
           "2026-01-06T10:00:00+00:00")
    git(root, "checkout", "-q", "main")
    git(root, "merge", "-q", "--no-edit", "-s", "ours", "other",
        GIT_COMMITTER_DATE="2026-01-07T10:00:00Z")
    commit(root, {"dvc.lock": "3\n"}, "run 3", "2026-01-08T10:00:00+01:00")
    git(root, "tag", "light", "HEAD~1")
    git(root, "tag", "-a", "ann", "-m", "x", "HEAD~3", GIT_COMMITTER_DATE="2026-02-01T00:00:00Z")
    return root


def test_log_lists_what_git_log_lists(repo: Path):
    want = git(repo, "log", "--reverse", "--format=%H %cI", "--", "dvc.lock").split("\n")
    with GitRepo(repo) as r:
        got = [f"{c.rev} {c.when}" for c in r.log("dvc.lock")]
    assert got == [line for line in want if line]
    assert len(got) == 3 and got[0].endswith("+05:30") and got[-1].endswith("+01:00")


def test_files_at_a_revision_and_head(repo: Path):
    with GitRepo(repo) as r:
        for rev in ("HEAD", "HEAD~2", "ann", "light"):
            assert r.show(rev, "dvc.lock") == git(repo, "show", f"{rev}:dvc.lock")
        assert r.show("HEAD~5", "dvc.lock") is None  # not there yet
        assert r.show("HEAD", "metrics") is None  # a folder
        assert r.exists_at("HEAD", "metrics/eval.json") and not r.exists_at("HEAD", "nope")
        assert not r.exists_at("no-such-rev", "dvc.lock")
        with pytest.raises(TlflowError, match=r"^git show no-such-rev:dvc.lock in .*repo"):
            r.show("no-such-rev", "dvc.lock")
        assert r.head() == git(repo, "rev-parse", "HEAD").strip()
        assert r.short(r.head()) == git(repo, "rev-parse", "--short", "HEAD").strip()
        assert r.tags() == git(repo, "tag", "--list").split() == ["ann", "light"]
        last = git(repo, "for-each-ref", "--sort=-creatordate", "--count=1",
                   "--format=%(creatordate:unix)", "refs/tags")
        assert r.last_tag_time() == int(last)


def test_paths_are_relative_to_the_folder_opened(repo: Path):
    with GitRepo(repo / "metrics") as r:
        assert r.top == repo.resolve() and r.name("eval.json") == "metrics/eval.json"
        assert r.show("HEAD", "eval.json") == '{"a": 1}\n'
    assert gitrepo.toplevel(repo / "metrics") == repo.resolve()


def test_dirty_and_changed_as_git_status_says(tmp_path: Path):
    git(tmp_path, "init", "-q")
    assert gitrepo.revision(tmp_path) is None  # no commit yet
    with GitRepo(tmp_path) as r:
        assert r.head() is None and r.log("dvc.lock") == [] and r.last_tag_time() is None
    commit(tmp_path, {"dvc.lock": "1\n", "params.yaml": "a\n"}, "one", "2026-01-01T00:00:00Z")
    short = git(tmp_path, "rev-parse", "--short", "HEAD").strip()
    (tmp_path / "untracked.txt").write_text("x")
    assert gitrepo.revision(tmp_path) == short  # untracked files do not make it dirty
    with GitRepo(tmp_path) as r:
        assert not r.is_dirty() and not r.changed("dvc.lock") and r.changed("untracked.txt")
        assert not r.changed("never-there")
        (tmp_path / "dvc.lock").write_text("2\n")
        assert r.is_dirty() and r.changed("dvc.lock") and not r.changed("params.yaml")
        git(tmp_path, "add", "dvc.lock")
        assert r.changed("dvc.lock")  # staged
        git(tmp_path, "commit", "-qm", "two")
        assert not r.changed("dvc.lock")
        (tmp_path / "params.yaml").unlink()
        assert r.changed("params.yaml") and r.is_dirty()
    assert gitrepo.revision(tmp_path).endswith("-dirty")


def test_init_add_commit(tmp_path: Path, monkeypatch):
    root = tmp_path / "p"
    GitRepo.init(root)
    (root / ".dvc" / "tmp").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("[core]\n")
    (root / ".dvc" / ".gitignore").write_text("/tmp\n")
    (root / ".dvc" / "tmp" / "lock").write_text("x")
    (root / "params.yaml").write_text("a: 1\n")
    (root / "left.txt").write_text("not added")
    for k, v in ID.items():
        monkeypatch.setenv(k, v)
    with GitRepo(root) as r:
        rev = r.add_commit(["params.yaml", ".dvc"], "tlflow init")
    assert rev == git(root, "rev-parse", "HEAD").strip()
    assert git(root, "ls-files").split() == [".dvc/.gitignore", ".dvc/config", "params.yaml"]
    assert git(root, "log", "--format=%an <%ae> %s").strip() == "t <t@t> tlflow init"
    assert git(root, "status", "--porcelain").strip() == "?? left.txt"


def test_outside_a_repository(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"^\S+: not a git repository$"):
        GitRepo(tmp_path)
    assert gitrepo.toplevel(tmp_path) is None and gitrepo.revision(tmp_path) is None
