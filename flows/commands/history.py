"""`tlflow history [--json]`: one line per versioned run."""

from __future__ import annotations

import argparse

from tlflow.flows.commands.base import Command, add_json


def arguments(p: argparse.ArgumentParser) -> None:
    add_json(p, "print JSON (one record per run)")


def run(args: argparse.Namespace) -> int:
    from tlflow.flows import history
    from tlflow.tasks.lib.core.params import load_params

    print("\n".join(history.run(load_params(), args.json)))
    return 0


COMMAND = Command(
    "history", "one line per versioned run (git's history of dvc.lock)", run, arguments,
    description="One line per versioned run (each commit of dvc.lock): when (ISO 8601 with "
                "the zone), git revision, data version (DVC's md5 of the manifest) and images "
                "added / removed, extractor, model, probe and fine-tuned test accuracy, GTO "
                "versions and stages at that commit, params that changed.")
