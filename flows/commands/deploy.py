"""`tlflow deploy --pool NAME`: a deployment of the project's flow on a work pool."""

from __future__ import annotations

import argparse

from tlflow.flows.commands.base import Command, add_schedule


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, help="the work pool's name")
    add_schedule(p, required=False)


def run(args: argparse.Namespace) -> int:
    """Register the deployment (workers of the pool run it here); print how to start one."""
    from tlflow.flows.pipeline import deploy
    from tlflow.flows.stages import check_project

    name = args.name or check_project().base.project
    deployment = deploy(name, args.pool, args.cron, args.interval)
    print(f"deployment tlflow-pipeline/{name} ({deployment}) on work pool {args.pool!r}; "
          f"start a worker with `prefect worker start --pool {args.pool}`")
    return 0


COMMAND = Command("deploy", "create a deployment on a Prefect work pool", run, arguments)
