import json
from pathlib import Path

import pytest

from tests.conftest import make_params
from tlflow.tasks import extract, ingest, train
from tlflow.tasks.lib.errors import TlflowError
from tlflow.tasks.lib.head import load_head, tensors_path


@pytest.mark.parametrize("classifier", ["logistic", "sgd"])
def test_train_stage_on_tiny_images(tmp_path: Path, image_folder: Path, classifier: str):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder)},
        extract={"layers": ["pooled", "blocks.2"], "image_size": 32},
        train={"classifier": classifier},
    )
    ingest.run(params)
    extract.run(params)
    head = train.run(params)
    probe = json.loads(params.base.paths.probe_report.read_text())
    assert len(probe["sweep"]) == 2 * len(params.train.C_grid)
    assert sorted(r["layer"] for r in probe["layers"]) == ["blocks.2", "pooled"]
    assert probe["best"]["layer"] == head.meta["layer"]
    assert head.meta["classifier"] == classifier
    assert head.classes == ("blue", "green", "red")
    assert probe["best"]["val_accuracy"] >= 0.8  # colour is easy
    metrics = json.loads(params.base.paths.probe_metrics.read_text())
    assert metrics == {"acc": probe["best"]["val_accuracy"],
                       **{k: probe["best"][k] for k in ("C", "layer")}}


def test_train_uses_cv_without_a_val_split(tmp_path: Path, image_folder: Path):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder), "val_fraction": 0.0},
        extract={"layers": ["pooled"], "image_size": 32}, train={"cv": 3},
    )
    for stage in (ingest, extract):
        stage.run(params)
    assert train.run(params).meta["val_accuracy"] >= 0.8


def test_train_needs_a_val_split(tmp_path: Path, image_folder: Path):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder), "val_fraction": 0.0},
        extract={"layers": ["pooled"], "image_size": 32},
    )
    ingest.run(params)
    extract.run(params)
    with pytest.raises(TlflowError, match="val split is empty"):
        train.run(params)


def test_train_writes_the_head_it_fitted_whatever_was_there(tmp_path: Path,
                                                             image_folder: Path):
    """A function of its inputs: a worse grid gives a worse head (no promotion inside train),
    and the first grid again gives the first head's bytes again."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    for stage in (ingest, extract, train):
        stage.run(params)
    first = tensors_path(params.base.paths.head).read_bytes()
    sidecar = params.base.paths.head.with_suffix(".json").read_bytes()
    raw = params.model_dump(mode="json")
    raw["train"]["C_grid"] = [1e-7]  # weights shrink to nothing: the majority class
    head = train.run(type(params).model_validate(raw))
    assert head.meta["C"] == 1e-7
    assert tensors_path(params.base.paths.head).read_bytes() != first
    train.run(params)
    assert tensors_path(params.base.paths.head).read_bytes() == first
    assert params.base.paths.head.with_suffix(".json").read_bytes() == sidecar


def test_a_damaged_head_is_repaired_by_rerunning_train(tmp_path: Path, image_folder: Path):
    """Train never reads the head it wrote before, so a truncated one is simply replaced."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    for stage in (ingest, extract, train):
        stage.run(params)
    path = tensors_path(params.base.paths.head)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TlflowError, match="not a safetensors head"):
        load_head(params.base.paths.head)
    train.run(params)
    assert path.read_bytes() == good
    assert load_head(params.base.paths.head).classes == ("blue", "green", "red")
