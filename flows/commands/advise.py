"""`tlflow advise [--json]`: the data set in the 2x2 table, and the plan."""

from __future__ import annotations

import argparse
import json

from tlflow.flows.commands.base import Command, add_json


def arguments(p: argparse.ArgumentParser) -> None:
    add_json(p)


def run(args: argparse.Namespace) -> int:
    """Measure size and similarity now (from the manifest, the sweep and the store), after
    bringing ingest, extract and train up to date: never the decision for other data."""
    from tlflow.flows.stages import bring_up_to_date
    from tlflow.tasks import advise
    from tlflow.tasks.lib.core.params import load_params
    from tlflow.tasks.lib.core.scope import scoped
    from tlflow.tasks.lib.probe.strategy import table

    params = load_params()
    bring_up_to_date(("ingest", "extract", "train"), params, "advise")
    decision = advise.run(scoped(params, advise.PARAMS))
    if args.json:
        print(json.dumps(decision.as_json(), indent=2, sort_keys=True))
    else:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(table(decision)))
    return 0


COMMAND = Command("advise", "place the data set in the 2x2 table and name the plan", run,
                  arguments)
