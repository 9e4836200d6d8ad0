"""`tlflow export [--model M] [--format onnx] [--out DIR]`: the served model as ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlflow.flows.commands.base import MODEL_HELP, MODELS, Command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="promoted", help=MODEL_HELP)
    p.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the only one)")
    p.add_argument("--out", type=Path, help="the folder (default base.paths.export)")


def run(args: argparse.Namespace) -> int:
    from tlflow.tasks import export
    from tlflow.tasks.lib.core.params import load_params
    from tlflow.tasks.lib.core.scope import scoped

    export.check_ready(args.format)
    if args.model != "promoted":  # as predict: the working tree's model may be stale
        from tlflow.flows.stages import warn_if_stale

        warn_if_stale(("extract", "train")
                      + (("finetune",) if args.model == "finetuned" else ()), "export")
    export.export_model(scoped(load_params(), export.PARAMS), args.model, args.format,
                        args.out)
    return 0


COMMAND = Command(
    "export", "write the served model as one ONNX graph (backbone and head) plus a JSON "
              "sidecar", run, arguments,
    description="Write the model predict would serve (--model) as one ONNX graph, backbone "
                "and head together: a preprocessed float32 batch (N, 3, H, W) in, class "
                "probabilities out, in <out>/<artifact>.onnx, and a JSON sidecar beside it "
                "(classes, preprocessing, the model's version and sha256). Prints the graph's "
                "path.")
