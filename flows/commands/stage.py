"""`tlflow stage NAME`: one stage in this process (the stage's cmd in dvc.yaml)."""

from __future__ import annotations

import argparse

from tlflow.flows.commands.base import Command
from tlflow.tasks.lib.core import interrupts


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="ingest | extract | train | finetune | evaluate | audit")


def run(args: argparse.Namespace) -> int:
    """What `dvc repro` runs: the code stamp is refreshed first, so dvc.lock records the code
    that ran."""
    from tlflow.flows.stages import stage_runner
    from tlflow.tasks.lib.core.codedeps import refresh_stamp
    from tlflow.tasks.lib.core.params import load_params

    runner = stage_runner(args.name)
    interrupts.doing(args.name)
    refresh_stamp()
    runner(load_params())
    return 0


COMMAND = Command("stage", "run one stage (the stage's cmd in dvc.yaml)", run, arguments)
