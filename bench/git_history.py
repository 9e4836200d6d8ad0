"""What `tlflow history` spends in git: the commits that changed dvc.lock, then dvc.lock and
the metrics file at each, and the tag list, read the way the project did before
tasks/lib/core/gitrepo.py (one `git` process per read, as flows/history.py ran them) and through
gitrepo (scmrepo: dulwich and libgit2 in-process), on a fresh repository of N commits of
dvc.lock (plus as many of other files between them).

    python bench/git_history.py [--commits 30] [--rounds 5]

Rounds alternate the two ways, so a change in the machine's load hits each alike; the
answers are checked equal before any time is printed. DVC's reads of the cached files
(dvc.api.read at each revision) are left out: they are the same either way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tlflow.tasks.lib.core import gitrepo

LOCK, METRICS = "dvc.lock", "metrics/eval.json"


def make_repo(root: Path, commits: int) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(root), *args], check=True, env=env,
                       capture_output=True)

    git("init", "-q")
    (root / "metrics").mkdir()
    for i in range(commits):
        (root / LOCK).write_text(f"schema: '2.0'\nstages:\n  train:\n    cmd: run {i}\n" * 20)
        (root / METRICS).write_text(f'{{"probe": {{"accuracy": {i / commits}}}}}\n')
        git("add", LOCK, METRICS)
        git("commit", "-qm", f"run {i}")
        (root / "notes.txt").write_text(f"{i}\n")  # a commit that leaves dvc.lock alone
        git("add", "notes.txt")
        git("commit", "-qm", f"notes {i}")


def by_subprocess(root: Path) -> list[tuple[str, str, str | None, str | None]]:
    """flows/history.py before gitrepo: git log, git show twice per commit, git tag --list."""
    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    git("tag", "--list")
    out = []
    for line in git("log", "--reverse", "--format=%H %cI", "--", LOCK).split("\n"):
        if line.strip():
            rev, when = line.split(" ", 1)
            out.append((rev, when, git("show", f"{rev}:{LOCK}"), git("show", f"{rev}:{METRICS}")))
    return out


def by_gitrepo(root: Path) -> list[tuple[str, str, str | None, str | None]]:
    """flows/history.py now: one GitRepo open for the whole walk."""
    with gitrepo.GitRepo(root) as repo:
        repo.tags()
        return [(c.rev, c.when, repo.show(c.rev, LOCK), repo.show(c.rev, METRICS))
                for c in repo.log(LOCK)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_repo(root, args.commits)
        assert by_subprocess(root) == by_gitrepo(root), "the two ways disagree"
        times: dict[str, list[float]] = {"subprocess git": [], "gitrepo (scmrepo)": []}
        for _ in range(args.rounds):
            for name, fn in (("subprocess git", by_subprocess),
                             ("gitrepo (scmrepo)", by_gitrepo)):
                t0 = time.perf_counter()
                fn(root)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["subprocess git"])
    print(f"{args.commits} commits of dvc.lock ({2 * args.commits} in all), "
          f"median of {args.rounds} rounds:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18s} {med * 1000:8.1f} ms  ({med / base:.2f}x subprocess)")


if __name__ == "__main__":
    main()
