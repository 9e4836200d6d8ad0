"""The advice: the data set placed in the 2x2 table from measured size and similarity."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import make_params, write_image
from tlflow.flows.cli import main
from tlflow.tasks import extract, finetune, ingest, train
from tlflow.tasks.lib.finetune.network import read_meta
from tlflow.tasks.lib.probe import strategy


def test_many_images_per_class_flip_the_size(tmp_path: Path):
    """Generated folders: 12 images per class is small, 80 is large (large_per_class: 40)."""
    placed = {}
    for n in (12, 80):
        src = tmp_path / f"src{n}"
        for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
            for i in range(n):
                write_image(src / f"c{c}" / f"{i}.png", colour, seed=1000 * c + i, size=8)
        params = make_params(tmp_path / f"p{n}", ingest={"source": "folder", "path": str(src)},
                             advise={"large_per_class": 40})
        placed[n] = strategy.size_of(ingest.run(params), params.advise)[0]
    assert placed == {12: "small", 80: "large"}


def _textures(root: Path, per_class: int = 45) -> Path:
    """Sine gratings in noise: three spatial frequencies, nothing like ImageNet's photos."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for c in range(3):
        for i in range(per_class):
            angle, freq = rng.uniform(0, np.pi), 0.15 + 0.2 * c
            wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
            arr = 128 + 90 * wave + rng.normal(0, 30, (64, 64, 3))
            (root / f"f{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"f{c}/{i}.png")
    return root


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tex")
    params = make_params(tmp, ingest={"source": "folder", "path": str(_textures(tmp / "src"))},
                         extract={"layers": ["pooled", "blocks.2"], "image_size": 64},
                         advise={"strategy": "auto"})
    for stage in (ingest, extract, train):
        stage.run(params)
    return params


def test_textures_are_placed_dissimilar_and_the_plan_is_carried_out(textures):
    advice = json.loads(textures.base.paths.strategy.read_text())
    assert (advice["size"], advice["similarity"], advice["plan"]) == (
        "small", "dissimilar", "early_probe")
    spread = advice["evidence"]["similarity"]["spread"]
    assert advice["evidence"]["similarity"]["spread_used"] and spread["top10_variance"] > 0.5
    assert advice["carried_out"]
    head = json.loads(Path(f"{textures.base.paths.head}.json").read_text())
    assert head["layer"] == "blocks.2"  # early_probe: the earlier layer, whatever the sweep
    assert finetune.run(textures) is None  # a probe plan fine-tunes nothing


def test_tlflow_advise_prints_the_table(textures, monkeypatch, capsys):
    root = textures.base.paths.images.parents[1]  # the project's paths lie inside it
    (root / "params.yaml").write_text(yaml.safe_dump(textures.model_dump(mode="json")))
    monkeypatch.chdir(root)
    assert main(["advise"]) == 0
    out = capsys.readouterr().out
    assert "early_probe ← this data set" in out and "top 10 components" in out
    assert main(["advise", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == "early_probe"


def test_forced_finetune_top_trains_the_last_blocks_then_all(textures):
    raw = textures.model_dump(mode="json")
    raw["advise"]["strategy"] = "finetune_top"
    raw["finetune"].update(epochs=1, batch_size=16, init_head="random")
    params = type(textures).model_validate(raw)
    train.run(params)
    assert json.loads(params.base.paths.strategy.read_text())["plan"] == "finetune_top"
    meta = finetune.run(params)
    assert meta.trainable in ("last_n_blocks", "last_n_blocks+all")
    assert meta.epochs_run == 2  # one epoch per phase
    assert read_meta(params.base.paths.finetuned).enabled
    assert len(params.base.paths.finetune_curve.read_text().splitlines()) == 3


@pytest.mark.slow
def test_advise_after_a_source_change_never_shows_the_old_data(
        tmp_path: Path, image_folder: Path, monkeypatch, capsys):
    """`tlflow advise` brings ingest -> extract -> train up to date first, as `dvc repro train`
    would; a folder source changes outside DVC's sight, so ingest rescans it."""
    import json

    import yaml

    from tests.conftest import copy_project
    from tlflow.flows.cli import main
    from tlflow.flows.stages import status

    root = copy_project(tmp_path / "project")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(image_folder))
    raw["extract"].update(layers=["pooled"], image_size=32)
    raw["train"].update(C_grid=[1.0])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(root)

    def advise() -> tuple[dict, str]:
        assert main(["advise", "--json"]) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err  # stdout holds only the JSON

    first, err = advise()
    assert first["evidence"]["size"]["classes"] == 3
    assert "bringing extract up to date first" in err
    shutil.rmtree(image_folder / "blue")  # the source changes; params.yaml does not
    second, err = advise()
    assert second["evidence"]["size"]["classes"] == 2
    assert second["evidence"]["size"]["train_images"] < first["evidence"]["size"]["train_images"]
    assert "bringing train up to date first" in err
    assert {s: why for s, why in status().items() if s in ("ingest", "extract", "train")} == {
        "ingest": None, "extract": None, "train": None}  # recorded in dvc.lock, as dvc repro
