import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import COLOURS, make_params, write_image
from tlflow.tasks import extract, ingest, train
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.probe.head import load_head, tensors_path


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
    assert probe["best"]["layer"] == head.meta.layer
    assert head.meta.classifier == classifier
    assert head.classes == ("blue", "green", "red")
    assert probe["best"]["val_accuracy"] >= 0.8  # colour is easy
    metrics = json.loads(params.base.paths.probe_metrics.read_text())
    assert metrics == {"acc": probe["best"]["val_accuracy"],
                       **{k: probe["best"][k] for k in ("C", "layer")}}
    assert json.loads(params.base.paths.compare_report.read_text()) == {"compared": False}
    assert (head.meta.backbone, head.meta.input_size) == (params.extract.backbone, 32)


def test_compare_backbones_and_every_stage_serves_the_winner(tmp_path: Path,
                                                             image_folder: Path, capsys):
    """extract.backbone Lite1 against Lite0: both separate the colours (val 1.0), a tie, so
    the cheaper Lite0 wins although it is not extract.backbone; train's head, train_choice,
    evaluate and predict all take Lite0's codes; a rerun computes no code."""
    from tlflow.tasks import evaluate, predict
    from tlflow.tasks.lib.core.handoff.extract import read_candidates
    from tlflow.tasks.lib.core.handoff.train import CompareReport, TrainChoice

    lite0, lite1 = "timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1"
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder)},
        extract={"backbone": lite1, "layers": ["pooled"], "image_size": 32,
                 "precision": "fp32", "compare": [lite0, lite1]})
    paths = params.base.paths
    ingest.run(params)
    extract.run(params)
    cands = read_candidates(paths.features)
    assert [(c.backbone, c.weights) for c in cands] == [(lite1, "packaged"), (lite0, "packaged")]
    assert cands[0].gflops > cands[1].gflops > 0 and cands[0].parameters > cands[1].parameters
    head = train.run(params)
    rep = CompareReport.read(paths.compare_report)
    assert [r.backbone for r in rep.rows] == [lite1, lite0]
    assert all(r.val_accuracy == 1.0 and r.images_per_s > 0 and r.store_mb > 0
               for r in rep.rows)
    assert rep.winner == lite0 == head.meta.backbone
    assert head.meta.extractor_id == rep.winner_extractor_id == cands[1].extractor_id
    assert TrainChoice.read(paths.train_choice).backbone == lite0
    metrics = json.loads(paths.probe_metrics.read_text())
    assert metrics["compare"] == {"lite1": 1.0, "lite0": 1.0}
    assert "* serves: timm/tf_efficientnet_lite0" in capsys.readouterr().out
    extract.run(params)
    assert capsys.readouterr().out.count(", 0 of 36 images to compute") == 2
    assert evaluate.run(params)["probe"]["accuracy"] == 1.0
    new = tmp_path / "x"
    new.mkdir()
    shutil.copy(tmp_path / "src" / "red" / "00.png", new / "a.png")  # in the store
    write_image(new / "b.png", COLOURS["green"], seed=4242)  # not: computed with Lite0
    capsys.readouterr()
    preds = predict.run(params, new, model="probe")
    assert [p.labels[0] for p in preds] == ["red", "green"]
    assert "1 codes from the store, 1 computed" in capsys.readouterr().err  # Lite0's store


def test_train_uses_cv_without_a_val_split(tmp_path: Path, image_folder: Path):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder), "val_fraction": 0.0},
        extract={"layers": ["pooled"], "image_size": 32}, train={"cv": 3},
    )
    for stage in (ingest, extract):
        stage.run(params)
    assert train.run(params).meta.val_accuracy >= 0.8


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
    assert head.meta.C == 1e-7
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


def test_a_compare_candidate_that_cannot_be_built_stops_extract_before_any_code(
        tmp_path: Path, image_folder: Path):
    """One line naming extract.compare and the candidate; no store is written, not even
    extract.backbone's (every candidate is built before any code is computed)."""
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder)},
        extract={"layers": ["pooled"], "image_size": 32, "compare": ["timm/no_such_net"]})
    ingest.run(params)
    with pytest.raises(TlflowError, match=r"extract.compare: timm/no_such_net \(weights "
                                          r"imagenet\): .*timm has no model 'no_such_net'"):
        extract.run(params)
    assert not list(params.base.paths.features.glob("*.h5"))
