"""`tlflow run [--force]`: the pipeline as a Prefect flow; only stale stages run."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING

from tlflow.flows.commands.base import Command
from tlflow.tasks.lib.core import interrupts

if TYPE_CHECKING:
    from tlflow.tasks.lib.core.params import Params


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rerun every stage")


def run(args: argparse.Namespace) -> int:
    """Run the flow (a temporary Prefect server when no PREFECT_API_URL is set); print which
    stages ran and the metrics. Exit 2 for bad input, 1 for another failure."""
    from tlflow.flows.stages import check_project

    params = check_project()
    from tlflow.tasks.lib.models.exported import check_stage_ready

    check_stage_ready(params.export.enabled)  # its optional packages: before any stage runs
    from tlflow.flows.pipeline import BAD_INPUT, mark_cancelled, pipeline
    from tlflow.flows.tempserver import prefect_api

    with prefect_api():  # no PREFECT_API_URL: a temporary server that dies with this process
        try:
            state = pipeline(force=args.force, return_state=True)
            interrupts.check()  # a signal that came as the run ended
        except BaseException:
            if interrupts.received() is not None:  # whatever it broke on the way
                # mark the flow run Cancelled while its API is still up (quietly: the
                # interrupted line is what the user reads)
                with contextlib.suppress(Exception):
                    mark_cancelled(interrupts.describe().removeprefix("interrupted: "))
                raise interrupts.Interrupted(interrupts.received()) from None
            raise
        if state.is_failed():
            print(f"error: {state.message}", file=sys.stderr)
            return 2 if state.name == BAD_INPUT else 1
        summary(state.result(), params)
    return 0


def summary(results: list, params: Params) -> None:
    """The run's table (stage, ran, why, seconds), how many new images look unlike the
    training set, the probe's layer sweep and the test metrics, on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tlflow run")
    for col in ("stage", "ran", "why", "seconds"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, "ran" if r.ran else "skipped", r.reason, f"{r.seconds:.1f}")
    console = Console(soft_wrap=True)  # a line is never broken inside, piped or not
    console.print(table)
    from tlflow.flows.drift import line, this_run
    from tlflow.tasks.lib.core.handoff.evaluate import EvalMetrics
    from tlflow.tasks.lib.core.handoff.train import ProbeReport

    paths = params.base.paths
    if (judged := this_run(paths)) is not None:
        console.print(line(judged), markup=False, highlight=False)
    if not (paths.eval_metrics.is_file() and paths.probe_report.is_file()):
        return
    probe = ProbeReport.read(paths.probe_report)
    sweep = Table(title="layer sweep (val)")
    for col in ("layer", "dim", "best C", "val accuracy"):
        sweep.add_column(col)
    for r in probe.layers:
        sweep.add_row(r.layer, str(r.dim), f"{r.C:g}", f"{r.val_accuracy:.4f}")
    console.print(sweep)
    metrics = EvalMetrics.read(paths.eval_metrics)
    best, test, ft = probe.best, metrics.probe, metrics.finetune
    console.print(
        f"probe: {best.classifier} on layer {best.layer}, C={best.C:g}, val accuracy "
        f"{best.val_accuracy:.4f}, test accuracy {test.accuracy:.4f}, macro F1 "
        f"{test.macro_f1:.4f}"
    )
    if ft is not None:
        from tlflow.tasks.lib.finetune.network import read_meta

        meta = read_meta(paths.finetuned)
        console.print(
            f"fine-tuned: {meta.trainable}, best epoch {meta.best_epoch}, val accuracy "
            f"{meta.val_accuracy if meta.val_accuracy is not None else float('nan'):.4f}, "
            "test accuracy "
            f"{ft.accuracy:.4f}, macro F1 {ft.macro_f1:.4f}"
        )


COMMAND = Command("run", "run the pipeline as a Prefect flow (only stale stages)", run,
                  arguments)
