"""The export stage on the tiny colour project (36 images, EfficientNet-Lite0, packaged
weights, 32 px): seconds off and on, the markers' and the graph's bytes, whether a second
export writes the same bytes, `dvc status` after the stages are recorded as `tlflow run`
records them, and `tlflow promote --model probe-onnx`'s seconds.

    python bench/export_stage.py /tmp/somewhere   (a folder that does not exist yet)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import colour_project
from tests.lib.test_registry import git
from tlflow.flows.cli import main
from tlflow.flows.stages import commit, status

RAN = ("ingest", "extract", "train", "finetune", "export")


def _timed(*args: str) -> float:
    t = time.perf_counter()
    assert main(list(args)) == 0, args
    return time.perf_counter() - t


def measure(base: Path) -> dict:
    root = colour_project(base)
    (root / ".gitignore").write_text("/.tlflow/\n/export/\n")
    git(root, "config", "user.name", "t")
    git(root, "config", "user.email", "t@t")
    os.chdir(root)
    with contextlib.redirect_stdout(io.StringIO()):
        for stage in RAN[:-1]:
            assert main(["stage", stage]) == 0
    off = _timed("stage", "export")
    markers = sum(p.stat().st_size for p in Path("models/exported").iterdir())
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["export"]["enabled"] = True
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    on = _timed("stage", "export")
    graph = Path("models/exported/probe.onnx").read_bytes()
    for stage in RAN:
        commit(stage)
    report = {k: v for k, v in status().items() if k in RAN}
    again = _timed("stage", "export")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")
    promote = _timed("promote", "--model", "probe-onnx")
    return {"stage_off_s": round(off, 2), "markers_bytes": markers, "stage_on_s": round(on, 2),
            "stage_on_again_s": round(again, 2), "graph_bytes": len(graph),
            "same_bytes_twice": Path("models/exported/probe.onnx").read_bytes() == graph,
            "dvc_status_of_the_recorded_stages": report, "promote_s": round(promote, 2)}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1])), indent=1))
