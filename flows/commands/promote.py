"""`tlflow promote [--model probe|finetuned|probe-onnx|finetuned-onnx] [--stage S] [--force]`:
GTO registration."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlflow.flows.commands.base import Command


def arguments(p: argparse.ArgumentParser) -> None:
    from tlflow.tasks.lib.models.exported import MODELS, artifact

    p.add_argument("--model", choices=(*MODELS, *map(artifact, MODELS)), default="probe",
                   help="which artifact (default probe; probe-onnx, finetuned-onnx: the export "
                        "stage's graph, promoted on its model's val accuracy)")
    p.add_argument("--force", action="store_true", help="promote even when the rule says no")
    p.add_argument("--stage", default="prod", help="the GTO stage (default prod)")


def run(args: argparse.Namespace) -> int:
    """Compare HEAD's model with the one in the stage; register and assign it if promoted."""
    from tlflow.tasks.lib.core.params import load_params
    from tlflow.tasks.lib.models import registry

    params = load_params()
    outcome = registry.promote(Path(), params.base.paths, params.train.promote_margin,
                               args.model, args.stage, args.force)
    print(registry.describe(outcome, args.stage))
    return 0


COMMAND = Command("promote", "register HEAD's model with GTO and assign it to a stage, unless "
                             "it is worse than the one serving", run, arguments)
