"""dvc.yaml and params.yaml say each path once and agree; stage cmds are `tlflow stage`."""

from pathlib import Path

import pytest
import yaml

from flows.stages import STAGES
from tests.conftest import ROOT

# What each stage reads from params.yaml besides its paths (dvc.yaml lists exactly these).
PARAMS_READ = {
    "ingest": {"base.seed", "ingest"},
    "extract": {"base.seed", "extract"},
    "train": {"base.seed", "extract.backbone", "extract.weights", "extract.image_size", "train",
              "advise"},
    "finetune": {"base.seed", "extract.backbone", "extract.weights", "extract.image_size",
                 "train.max_iter", "train.class_weight", "finetune", "advise.strategy"},
    "evaluate": set(),
}


@pytest.fixture(scope="module")
def stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {s.name: s for s in repo.index.stages}


@pytest.fixture(scope="module")
def paths() -> dict[str, str]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["base"]["paths"]


def _outs(stage) -> set[str]:
    return {str(o.def_path) for o in stage.outs}


def _deps(stage) -> set[str]:
    return {str(d.def_path) for d in stage.deps if not hasattr(d, "params")}


def test_stages_match_the_flow(stages):
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage.cmd == f"tlflow stage {name}"


def test_every_path_is_an_output_of_one_stage(stages, paths):
    outs = {name: _outs(s) for name, s in stages.items()}
    paths = dict(paths)
    head, finetuned = paths.pop("head"), paths.pop("finetuned")
    assert paths.pop("hash_cache").startswith(".")  # a cache, not versioned data
    assert paths.pop("finetune_checkpoints").startswith(".")  # resumable state, not versioned
    expected = {
        "ingest": {paths["images"], paths["manifest"]},
        "extract": {paths["features"], paths["extract_report"]},
        "train": {f"{head}.safetensors", f"{head}.json", paths["probe_metrics"],
                  paths["strategy"]},
        "finetune": {f"{finetuned}.safetensors", f"{finetuned}.json", paths["finetune_curve"]},
        "evaluate": {paths["eval_metrics"], paths["confusion"], paths["confusion_png"]},
    }
    assert outs == expected


def test_each_stage_depends_on_what_it_reads(stages, paths):
    head, finetuned = paths["head"], paths["finetuned"]
    probe = {paths["manifest"], paths["features"], paths["extract_report"],
             f"{head}.safetensors", f"{head}.json"}
    data = {
        "ingest": set(),
        "extract": {paths["manifest"]},
        "train": {paths["manifest"], paths["features"], paths["extract_report"]},
        # not the saved probe: the network's head starts from one fitted on train only
        "finetune": {paths["manifest"], paths["features"], paths["extract_report"],
                     paths["images"], paths["probe_metrics"], paths["strategy"]},
        "evaluate": {*probe, paths["images"], f"{finetuned}.safetensors", f"{finetuned}.json"},
    }
    for name, stage in stages.items():
        deps = _deps(stage)
        assert f"tasks/{name}.py" in deps
        assert {d for d in deps if not d.startswith("tasks/")} == data[name]
        for code in (d for d in deps if d.startswith("tasks/")):
            assert (ROOT / code).is_file(), code


def test_params_are_exactly_what_each_stage_reads(stages):
    for name, stage in stages.items():
        declared = {key for dep in stage.deps if hasattr(dep, "params") for key in dep.params}
        assert declared == PARAMS_READ[name], name


def test_metrics_and_plots_are_declared_for_dvc(stages, paths):
    metrics = {str(o.def_path) for s in stages.values() for o in s.outs if o.metric}
    assert metrics == {paths["extract_report"], paths["probe_metrics"], paths["strategy"],
                       paths["eval_metrics"]}
    curve, csv, png = [o for s in stages.values() for o in s.outs if o.plot]
    assert str(curve.def_path) == paths["finetune_curve"] and curve.plot["x"] == "epoch"
    assert str(csv.def_path) == paths["confusion"]
    assert csv.plot["template"] == "confusion"
    assert str(png.def_path) == paths["confusion_png"]
    assert Path(ROOT / "dvc.yaml").read_text().count("template: confusion") == 1
