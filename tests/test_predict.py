import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import COLOURS, ROOT, cli_env, run_cli, write_image
from tlflow.flows.cli import main


@pytest.fixture
def trained(tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(image_folder))
    raw["extract"].update(layers=["pooled", "blocks.2"], image_size=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    for stage in ("ingest", "extract", "train"):
        assert main(["stage", stage]) == 0
    return tmp_path


def test_a_cached_image_is_not_recomputed(trained: Path, monkeypatch, capsys):
    import tlflow.tasks.lib.features.backbones

    def no_model(*_a, **_k):
        raise AssertionError("the backbone was built for an image already in the store")

    monkeypatch.setattr(tlflow.tasks.lib.features.backbones, "create_backbone", no_model)
    capsys.readouterr()
    assert main(["predict", "data/images/red/00.png"]) == 0
    out, err = capsys.readouterr()
    assert "1 codes from the store, 0 computed" in err
    assert out.splitlines()[1].startswith("data/images/red/00.png,red,")


def test_new_images_are_computed_and_written(trained: Path, tmp_path: Path, capsys):
    new = tmp_path / "new"
    for name, colour in COLOURS.items():
        write_image(new / f"{name}.png", colour, seed=4242)
    capsys.readouterr()
    assert main(["predict", str(new), "--top-k", "2", "--out", "preds.csv"]) == 0
    assert "0 codes from the store, 3 computed" in capsys.readouterr().err
    with open("preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).stem for r in rows] == sorted(COLOURS)
    for r in rows:
        assert r["label_1"] == Path(r["path"]).stem  # colour is easy
        assert 1.0 >= float(r["probability_1"]) >= float(r["probability_2"]) >= 0.0


def test_new_images_get_codes_in_the_precision_of_the_served_head(trained: Path,
                                                                    tmp_path: Path, capsys):
    """A head trained on codes of one precision (auto here; bf16 on a CPU with AMX or
    AVX512-BF16) is served with codes of that precision whatever extract.precision says now
    (a head trained on another machine, whose auto differs)."""
    import torch

    from tlflow.tasks.lib.core.device import effective_precision

    raw = yaml.safe_load(Path("params.yaml").read_text())
    trained_in = effective_precision(torch.device("cpu"), "auto")
    raw["extract"]["precision"] = "fp32" if trained_in == "bf16" else "bf16"
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    new = tmp_path / "new"
    for name, colour in COLOURS.items():
        write_image(new / f"{name}.png", colour, seed=77)
    capsys.readouterr()
    assert main(["predict", str(new), "--out", "preds.csv"]) == 0
    assert "0 codes from the store, 3 computed" in capsys.readouterr().err
    with open("preds.csv") as f:
        assert all(r["label_1"] == Path(r["path"]).stem for r in csv.DictReader(f))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["predict", "nowhere.png"], "nowhere.png: no such image or folder"),
        (["predict", "data/images", "--top-k", "9"], "--top-k: must be between 1 and 3"),
        (["predict", "data/images", "--out", "data"], "--out: data: a folder where a file goes"),
    ],
)
def test_bad_predict_input(trained: Path, capsys, args, needle):
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_predict_refuses_changed_params(trained: Path, tmp_path: Path, capsys):
    """The backbone and input size come from the head (a changed extract.image_size does not
    change what it serves); params that change its codes otherwise are refused."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["extract"]["image_size"] = 48
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    write_image(tmp_path / "x.png", COLOURS["red"], seed=9999)  # bytes not in the store
    assert main(["predict", str(tmp_path / "x.png")]) == 0
    assert "0 codes from the store, 1 computed" in capsys.readouterr().err
    raw["extract"]["dtype"] = "float32"
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    assert "the head was trained on" in capsys.readouterr().err


def test_min_confidence_and_novel_images(trained: Path, tmp_path: Path, capsys):
    """The reject option and the drift flag end to end: label_1 stays the model's top label,
    `prediction` says unsure below the min confidence (the calibrated one, in `confidence`),
    and an image unlike the three colours is novel while the training images are not."""
    from PIL import Image

    new = tmp_path / "new"
    new.mkdir()
    rng = np.random.default_rng(5)
    stripes = np.zeros((24, 24, 3), np.uint8)
    stripes[::2] = 255  # black and white lines: no colour of the training set
    Image.fromarray(stripes).save(new / "stripes.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(new / "noise.png")
    capsys.readouterr()
    assert main(["predict", str(new), "--model", "probe", "--out", "new.csv"]) == 0
    assert "2 of 2 new images look unlike the training set" in capsys.readouterr().err
    assert main(["predict", "data/images", "--model", "probe", "--min-confidence", "0.999",
                 "--out", "own.csv"]) == 0
    err = capsys.readouterr().err
    assert "unsure (calibrated confidence below 0.999)" in err
    with open("own.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36
    # 1% of a val split of 9 noisy images sets no exact rate (the rates are checked on the
    # photos, tests/test_accuracy.py): the colour images are far less often novel than not
    assert sum(r["novel"] == "true" for r in rows) <= 9, err
    for r in rows:
        assert r["label_1"] == Path(r["path"]).parent.name
        unsure = float(r["confidence"]) < 0.999
        assert r["prediction"] == ("unsure" if unsure else r["label_1"])
    assert main(["predict", "data/images", "--min-confidence", "1.5"]) == 2
    assert "--min-confidence: must be in (0, 1], got 1.5" in capsys.readouterr().err


def _list_modules() -> str:
    """bench/predict_startup.py's MODULES: `tlflow predict IMAGE`, writing the top-level
    names of sys.modules at exit to argv[1] (one script for the bench and this test)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_startup",
                                                  ROOT / "bench" / "predict_startup.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.MODULES


def test_predict_imports_only_what_it_needs(trained: Path, tmp_path: Path):
    """One new image through `tlflow predict` in a fresh process, in a git repo with no model
    promoted: codes computed, the novelty check run, and neither Prefect nor DVC imported,
    nor scikit-learn (the novelty distance is numpy), scipy, pandas or GTO (asked only when a
    tag assigns a model to a stage). bench/predict_startup.py times it."""
    from tlflow.tasks.lib.core.gitrepo import GitRepo

    GitRepo.init(trained)
    image = write_image(tmp_path / "new" / "x.png", COLOURS["red"], seed=31337)
    listing = tmp_path / "modules.json"
    done = run_cli([sys.executable, "-c", _list_modules(), str(listing), str(image)], trained,
                   cli_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith(f"{image},red,")
    assert "0 codes from the store, 1 computed" in done.stderr
    assert "new image looks" in done.stderr  # the novelty check ran
    loaded = set(json.loads(listing.read_text()))
    assert {"torch", "timm", "tlflow"} <= loaded
    assert not loaded & {"prefect", "dvc", "sklearn", "scipy", "pandas", "gto"}
