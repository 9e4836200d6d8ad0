"""`tlflow init [DIR] [--images FOLDER | --csv FILE]`: make a folder a project of one's own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlflow.flows.commands.base import Command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", type=Path, default=Path(), help="the project folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, metavar="FOLDER",
                     help="images in one folder per class (or train/val/test folders of them)")
    src.add_argument("--csv", type=Path, metavar="FILE",
                     help="a CSV of path,label[,split] (paths relative to it)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing params.yaml, dvc.yaml and artifacts.yaml")
    p.add_argument("--commit", action="store_true", help="git commit the project's files")


def run(args: argparse.Namespace) -> int:
    """Write the project; what was done on stderr, its path on stdout."""
    from tlflow.flows.project import init_project, source_of

    done = init_project(args.dir, source_of(args.images, args.csv), force=args.force,
                        commit=args.commit)
    for line in done:
        print(f"init: {line}", file=sys.stderr)
    where = args.dir.expanduser().resolve()
    step = "" if where == Path.cwd().resolve() else f"cd {args.dir} && "
    print(f"init: next: {step}tlflow run", file=sys.stderr)
    print(where)
    return 0


COMMAND = Command(
    "init", "make a folder a tlflow project of your own (params.yaml, dvc.yaml, git and DVC)",
    run, arguments,
    description="Make DIR (default: here) a tlflow project: params.yaml (every key documented, "
                "the source filled in), dvc.yaml, artifacts.yaml, .gitignore, .dvcignore, a "
                "DVC default remote beside DIR, a README; then `git init` (or DVC's --subdir "
                "layout inside a git repository) and `dvc init`. No code is copied; nothing is "
                "committed unless --commit. Then: cd DIR && tlflow run.")
