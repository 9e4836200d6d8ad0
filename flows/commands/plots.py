"""`tlflow plots [--open]`: the project's DVC plots on one page that opens offline."""

from __future__ import annotations

import argparse
import sys

from tlflow.flows.commands.base import Command, open_page


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--open", action="store_true", help="also open it in the web browser")


def run(args: argparse.Namespace) -> int:
    """Write the page; its path on stdout, what it holds on stderr."""
    from tlflow.flows.dvc_plots import write_page
    from tlflow.flows.stages import check_project

    page, plots, errors = write_page(check_project().base.paths)
    for line in errors:
        print(f"plots: dvc: {line}", file=sys.stderr)
    print(f"plots: {len(plots)} plot(s): {', '.join(p.name for p in plots) or 'none'}",
          file=sys.stderr)
    print(page)
    if args.open:
        open_page(page)
    return 0


COMMAND = Command(
    "plots", "draw the project's DVC plots to one page that opens offline "
             "(base.paths.plots_page); no stage runs", run, arguments,
    description="Draw what `dvc plots show` computes from the workspace (the filled "
                "Vega-Lite specs and the images) to SVG with vl-convert, on one page "
                "(base.paths.plots_page) that needs no network, no npm and no script. Prints "
                "its path.")
