"""Accuracy claims on real images: the linear probe on hymenoptera (ants and bees)."""

import json
from pathlib import Path

import pytest

from tests.conftest import make_params
from tlflow.tasks import evaluate, extract, ingest, train


@pytest.mark.slow
def test_probe_on_hymenoptera(tmp_path: Path, hymenoptera: Path):
    """Every default but the source: train/ gives train and val, val/ is the test set;
    image_size auto takes the model's own 224 px for photos; pooled codes win: >= 0.93."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(hymenoptera)})
    assert params.extract.image_size == "auto"
    rows = ingest.run(params)
    assert sum(r.split == "test" for r in rows) == 153
    extract.run(params)
    report = json.loads(params.base.paths.extract_report.read_text())
    assert report["image_size"] == 224, report["image_size_why"]
    head = train.run(params)
    metrics = evaluate.run(params)
    assert head.meta["layer"] == "pooled"  # ants and bees are ImageNet-like: late codes win
    assert metrics["probe"]["accuracy"] >= 0.93, metrics["probe"]

    advice = json.loads(params.base.paths.strategy.read_text())
    assert (advice["size"], advice["similarity"], advice["plan"]) == ("small", "similar", "probe")
    assert advice["evidence"]["similarity"]["spread"]["top10_variance"] < 0.5
