import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tasks import evaluate, extract, ingest, train
from tasks.lib.errors import TlflowError
from tasks.lib.evaluation import score, write_confusion
from tasks.lib.manifest import read_manifest
from tests.conftest import make_params


def test_score_on_known_predictions():
    y_true = np.array(["a", "a", "b", "b"])
    y_pred = np.array(["a", "b", "b", "b"])
    m = score(y_true, y_pred, ("a", "b"))
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5,
                                   "f1-score": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_confusion_csv_has_one_row_per_image(tmp_path: Path):
    write_confusion(tmp_path / "c.csv", np.array(["a", "b"]), np.array(["b", "b"]))
    with open(tmp_path / "c.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"actual": "a", "predicted": "b"}, {"actual": "b", "predicted": "b"}]


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
    assert on_disk == metrics
    probe = on_disk["probe"]
    assert set(probe) >= {"accuracy", "macro_f1", "per_class"}
    assert set(probe["per_class"]) == {"blue", "green", "red"}
    n_test = sum(r.split == "test" for r in read_manifest(trained.base.paths.manifest))
    assert probe["n"] == n_test
    with open(trained.base.paths.confusion) as f:
        assert sum(1 for _ in f) == n_test + 1
    from PIL import Image

    with Image.open(trained.base.paths.confusion_png) as png:
        assert png.format == "PNG" and min(png.size) >= 300


def test_evaluate_refuses_a_head_of_another_extractor(trained):
    meta = trained.base.paths.head.parent / "head.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "extractor_id": "0000"}))
    with pytest.raises(TlflowError, match="trained on codes of extractor 0000"):
        evaluate.run(trained)


def test_evaluate_without_head(tmp_path: Path, image_folder: Path):
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    ingest.run(params)
    extract.run(params)
    with pytest.raises(TlflowError, match="run `tlflow stage train`"):
        evaluate.run(params)
