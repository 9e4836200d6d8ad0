"""`tlflow predict TARGET`: label images with the trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlflow.flows.commands.base import MODEL_HELP, MODELS, Command
from tlflow.tasks.lib.core import interrupts


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=Path, help="an image or a folder of images")
    p.add_argument("--top-k", type=int, default=1, help="how many labels per image")
    p.add_argument("--out", type=Path, help="also write the predictions to this CSV")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) on the first unreadable image instead of skipping it")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="label an image `unsure` when its calibrated top probability is "
                        "below P (default predict.min_confidence)")
    p.add_argument("--model", choices=MODELS, default="promoted", help=MODEL_HELP)


def run(args: argparse.Namespace) -> int:
    """CSV rows on stdout (and --out); skipped images and notes on stderr."""
    from tlflow.tasks import predict
    from tlflow.tasks.lib.core.params import load_params
    from tlflow.tasks.lib.core.scope import scoped

    if args.model != "promoted":  # a promoted model is a committed version
        from tlflow.flows.stages import warn_if_stale

        warn_if_stale(("ingest", "extract", "train")
                      + (("finetune",) if args.model == "finetuned" else ()), "predict")
    interrupts.doing("predict")
    predict.run(scoped(load_params(), predict.PARAMS), args.target, args.top_k, args.out,
                args.model, args.strict, args.min_confidence)
    return 0


COMMAND = Command("predict", "label images with the trained head", run, arguments)
