"""The report's charts, as Vega-Lite specs drawn to SVG by vl-convert (flows/dvc_plots.to_svg):
inline in the page, no script, no network.

The sweep is also a DVC plot (plots/sweep.csv, dvc.yaml's top-level `plots:`), which DVC's
stock templates draw on a linear axis of log10 C; here C is on a log axis and the chosen
(layer, C) is marked, which DVC's templates cannot do.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tlflow.flows.dvc_plots import to_svg
from tlflow.tasks.lib.core.files import write_text
from tlflow.tasks.lib.core.handoff.train import ProbeChoice, ProbeReport, SweepRow

VEGA_LITE = "https://vega.github.io/schema/vega-lite/v5.json"  # the schema's id, not fetched


def sweep_spec(sweep: Sequence[SweepRow], best: ProbeChoice) -> dict[str, Any]:
    """Val accuracy against C (log axis), one line per layer, the chosen (layer, C) ringed
    and named in the subtitle. `sweep`: rows with layer, C, val_accuracy (reports/probe.json's
    `sweep`); `best`: its `best`."""
    rows = sorted(({"layer": r.layer, "C": r.C, "val_accuracy": r.val_accuracy}
                   for r in sweep), key=lambda r: (r["layer"], r["C"]))
    chosen = [{"layer": best.layer, "C": best.C, "val_accuracy": best.val_accuracy}]
    x = {"field": "C", "type": "quantitative", "scale": {"type": "log"}, "title": "C"}
    y = {"field": "val_accuracy", "type": "quantitative", "scale": {"zero": False},
         "title": "val accuracy"}
    return {
        "$schema": VEGA_LITE, "width": 420, "height": 260,
        "title": {"text": "probe sweep: val accuracy per C, one line per layer",
                  "subtitle": f"ringed: the chosen probe, {best.layer} at C={best.C:g} "
                              f"(val accuracy {best.val_accuracy:.4f})"},
        "layer": [
            {"data": {"values": rows}, "mark": {"type": "line", "point": True},
             "encoding": {"x": x, "y": y, "color": {"field": "layer", "type": "nominal"}}},
            {"data": {"values": chosen},
             "mark": {"type": "point", "size": 260, "strokeWidth": 2.5, "color": "black"},
             "encoding": {"x": x, "y": y}},
        ],
    }


_CACHED = re.compile(r"^[0-9a-f]{16}\.svg$")


def cached_svg(spec: dict[str, Any], folder: Path) -> str:
    """to_svg(spec), kept in `folder` as <hash of the spec and vl-convert's version>.svg and
    read from there while the spec is the same: a `tlflow run` that changes no result need
    not start vl-convert's engine (about 1 s). The folder keeps only this chart's file."""
    key = hashlib.sha256((json.dumps(spec, sort_keys=True) + version("vl-convert-python"))
                         .encode()).hexdigest()[:16]
    path = folder / f"{key}.svg"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    svg = to_svg(spec)
    write_text(path, svg)
    for old in folder.iterdir():
        if _CACHED.match(old.name) and old != path:
            old.unlink()
    return svg


def sweep_svg(probe_report: ProbeReport, folder: Path) -> str | None:
    """The sweep chart as SVG (cached in `folder`: cached_svg); None when the sweep is
    empty."""
    if not probe_report.sweep:
        return None
    return cached_svg(sweep_spec(probe_report.sweep, probe_report.best), folder)
