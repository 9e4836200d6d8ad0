import csv
import json
from pathlib import Path

import pytest

from tests.conftest import make_params
from tlflow.tasks import evaluate, extract, ingest, train
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.evaluate import EvalMetrics, PerClass, Predictions
from tlflow.tasks.lib.data.manifest import read_manifest


@pytest.fixture
def trained(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    for stage in (ingest, extract, train):
        stage.run(params)
    return params


def test_evaluate_writes_metrics_and_confusion(trained):
    metrics = evaluate.run(trained)
    on_disk = json.loads(trained.base.paths.eval_metrics.read_text())
    assert on_disk == {"probe": {k: metrics["probe"][k]
                                 for k in ("accuracy", "macro_f1", "n", "ece", "ece_t")}}
    assert 0 <= on_disk["probe"]["ece_t"] <= 1
    with open(trained.base.paths.coverage) as f:  # the reject option's plot, one row per P
        coverage = list(csv.DictReader(f))
    assert [r["min_confidence"] for r in coverage] == ["0.5", "0.8", "0.9", "0.95"]
    assert [int(r["kept"]) for r in coverage] == sorted((int(r["kept"]) for r in coverage),
                                                        reverse=True)
    probe = EvalMetrics.read(trained.base.paths.eval_metrics).probe
    per_class = PerClass.read(trained.base.paths.per_class).rows
    assert {r.label for r in per_class} == set(metrics["probe"]["per_class"]) \
        == {"blue", "green", "red"}
    n_test = sum(r.split == "test" for r in read_manifest(trained.base.paths.manifest))
    assert probe.n == n_test
    with open(trained.base.paths.confusion) as f:
        assert sum(1 for _ in f) == n_test + 1
    assert trained.base.paths.confusion_finetune.read_text() == "actual,predicted,relpath\n"
    preds = Predictions.read(trained.base.paths.predictions).rows
    test = {r.relpath for r in read_manifest(trained.base.paths.manifest) if r.split == "test"}
    assert {p.relpath for p in preds} == test and {p.model for p in preds} == {"probe"}
    assert sum(not p.correct for p in preds) == round((1 - probe.accuracy) * n_test)
    assert all(p.kind == "probability" and len(p.top) == 3 and p.loss >= 0 for p in preds)
    from PIL import Image

    with Image.open(trained.base.paths.confusion_png) as png:
        assert png.format == "PNG" and min(png.size) >= 300


def test_evaluate_refuses_a_head_of_another_extractor(trained):
    meta = trained.base.paths.head.parent / "head.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "extractor_id": "0000"}))
    with pytest.raises(TlflowError, match="names the codes of extractor 0000, which"):
        evaluate.run(trained)


def test_evaluate_without_head(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    ingest.run(params)
    extract.run(params)
    with pytest.raises(TlflowError, match="run `tlflow stage train`"):
        evaluate.run(params)
