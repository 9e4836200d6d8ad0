"""`tlflow serve --cron EXPR | --interval S`: serve the pipeline flow on a schedule."""

from __future__ import annotations

import argparse

from tlflow.flows.commands.base import Command, add_schedule
from tlflow.tasks.lib.core import interrupts
from tlflow.tasks.lib.core.errors import TlflowError


def arguments(p: argparse.ArgumentParser) -> None:
    add_schedule(p, required=True)


def run(args: argparse.Namespace) -> int:
    """Serve the flow in this process; each scheduled run takes the data source as it is.
    On the way out the deployment is paused and its scheduled runs deleted
    (flows/pipeline.clear_schedule)."""
    from tlflow.flows.stages import check_project

    name = args.name or check_project().base.project
    from tlflow.flows.pipeline import clear_schedule, pipeline
    from tlflow.flows.tempserver import prefect_api

    # limit=1: runs of one project never overlap (they share its files and dvc.lock)
    interrupts.doing("serve")
    try:
        with prefect_api():
            try:
                pipeline.serve(name=name, cron=args.cron, interval=args.interval, limit=1)
            finally:  # Prefect's runner pauses its deployment on the way out; make sure
                clear_schedule(name)
    except (ValueError, TypeError) as err:  # e.g. a cron expression Prefect cannot parse
        raise TlflowError(f"tlflow serve: {err}") from None
    interrupts.check()  # Prefect's serve returns quietly on Ctrl-C: exit 130 all the same
    return 0


COMMAND = Command("serve", "serve the pipeline flow on a schedule (Prefect)", run, arguments)
