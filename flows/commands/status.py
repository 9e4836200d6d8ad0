"""`tlflow status [--json] [-q]`: each stage up to date, or stale and why."""

from __future__ import annotations

import argparse
import json

from tlflow.flows.commands.base import Command, add_json


def arguments(p: argparse.ArgumentParser) -> None:
    add_json(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing; exit 1 when a stage is stale, 0 when all are up to "
                        "date (as `dvc status -q`)")


def run(args: argparse.Namespace) -> int:
    """The same answer as `dvc status`; quiet, only the exit status: 1 when a stage is
    stale."""
    from tlflow.flows.stages import check_project, status

    check_project()
    report = status()
    if args.quiet:
        return 1 if any(report.values()) else 0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(map(len, report))
    for name, why in report.items():
        print(f"{name:<{width}}  {'up to date' if why is None else 'stale: ' + why}")
    return 0


COMMAND = Command("status", "each stage: up to date, or stale and why (dvc status)", run,
                  arguments)
