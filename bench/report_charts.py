"""What the report's charts cost: `write_report` on a project that has run, each build in a
fresh process (imports counted, as in `tlflow run`), without the sweep chart and the map,
with them from scratch (no report folder), and with them kept from the build before.

    python bench/report_charts.py PROJECT [--rounds 2]

Rounds alternate the variants, so a change in the machine's load hits each alike; the
ratios to the build without charts come last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUILD = """
import sys
from tlflow.flows import html_report
from tlflow.tasks.lib.core.params import load_params
if sys.argv[1] == "plain":
    html_report.sweep_chart = lambda paths: None
    html_report.map_view = lambda paths, preds, thumb: None
paths = load_params().base.paths
html_report.write_report(paths, {})
print(paths.report.stat().st_size)
"""


def _build(project: Path, variant: str, fresh: bool) -> tuple[float, int]:
    if fresh:
        from tlflow.tasks.lib.core.params import params_under

        folder = params_under(project, project / "params.yaml").base.paths.report.parent
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BUILD, variant], cwd=project, check=True,
                         capture_output=True, text=True).stdout
    return time.perf_counter() - t0, int(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores; {args.project}")
    seconds: dict[str, list[float]] = {"without charts": [], "charts, from scratch": [],
                                       "charts, kept": []}
    for _ in range(args.rounds):
        for name, variant, fresh in (("without charts", "plain", True),
                                     ("charts, from scratch", "charts", True),
                                     ("charts, kept", "charts", False)):
            s, size = _build(args.project, variant, fresh)
            seconds[name].append(s)
            print(f"  {name:22s} {s:6.2f} s   page {size / 1000:.1f} KB", flush=True)
    base = min(seconds["without charts"])
    for name, values in seconds.items():
        print(f"{name:22s} best {min(values):.2f} s, {min(values) / base:.2f}x without charts")


if __name__ == "__main__":
    main()
