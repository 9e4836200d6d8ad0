"""`tlflow report [--open]`: the offline HTML report from the last run's outputs."""

from __future__ import annotations

import argparse
import sys

from tlflow.flows.commands.base import Command, open_page


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--open", action="store_true", help="also open it in the web browser")
    p.add_argument("--against", metavar="REV", help="show what changed since the run "
                   "committed at this git revision (default HEAD)")


def run(args: argparse.Namespace) -> int:
    """Write the report; its path on stdout, counts on stderr. A bad --against is one line
    before anything else is said or written."""
    from tlflow.flows.html_report import write_report
    from tlflow.flows.stages import STAGES, warn_if_stale
    from tlflow.tasks.lib.core.params import load_params

    paths = load_params().base.paths
    written = write_report(paths, against=args.against)
    warn_if_stale(STAGES, "report")
    wrong = ", ".join(f"{m} {n} wrong" for m, n in written.misclassified.items())
    print(f"report: {wrong or 'no predictions'}; {written.near_duplicates} near-duplicate "
          f"pair(s), {written.label_issues} likely label error(s); {written.thumbnails} "
          "thumbnails", file=sys.stderr)
    print(written.page)
    if args.open:
        open_page(written.page)
    return 0


COMMAND = Command(
    "report", "write the offline HTML report (base.paths.report) from the last run's outputs; "
              "no stage runs", run, arguments,
    description="Write the offline HTML report (base.paths.report, thumbnails beside it) from "
                "what the last run wrote: test metrics against the run committed at git HEAD "
                "(or --against REV) and what changed since it (per class, per image, the "
                "data), per-class table, confusion matrices, the fine-tuning curve, the "
                "advice, the misclassified test images, near-duplicates across splits and "
                "likely label errors. Prints its path.")
