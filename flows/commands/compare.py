"""`tlflow compare [--json]`: the backbones of extract.compare, measured."""

from __future__ import annotations

import argparse
import json
import sys

from tlflow.flows.commands.base import Command, add_json


def arguments(p: argparse.ArgumentParser) -> None:
    add_json(p, "reports/compare.json as it is")


def run(args: argparse.Namespace) -> int:
    """The last run's comparison (base.paths.compare_report): a table on stdout, or the
    file's JSON; a line saying how to ask for one when none ran."""
    from tlflow.flows.stages import warn_if_stale
    from tlflow.tasks.lib.assess.compare import format_table
    from tlflow.tasks.lib.core.handoff.train import CompareReport
    from tlflow.tasks.lib.core.params import load_params

    paths = load_params().base.paths
    warn_if_stale(("ingest", "extract", "train"), "compare")
    rep = CompareReport.read(paths.compare_report)
    if args.json:
        print(json.dumps(rep.as_json(), indent=2, sort_keys=True))
    elif not rep.compared:
        print("compare: no comparison ran; list backbones in params.yaml extract.compare, "
              "e.g. [timm/tf_efficientnet_lite1, timm/tf_efficientnet_lite2], and run "
              "`tlflow run`", file=sys.stderr)
    else:
        print(format_table(rep))
    return 0


COMMAND = Command("compare", "the backbones of extract.compare, measured: one row each, the "
                             "winner marked (the last run's)", run, arguments)
