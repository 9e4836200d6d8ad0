"""dvc.yaml agrees with the code: paths said once (params.yaml), each stage's code entry in
the stamp (tlflow-code.yaml) derived from its imports, params from each stage's PARAMS
declaration; stage cmds are `tlflow stage`."""

import importlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tlflow.flows.stages import STAGES
from tlflow.tasks.lib.core.codedeps import STAMP, stage_modules


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


def _params(stage, file: str = "params.yaml") -> set[str]:
    return {key for d in stage.deps if hasattr(d, "params") and str(d.def_path) == file
            for key in d.params}


def test_stages_match_the_flow(stages):
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage.cmd == f"tlflow stage {name}"


def test_every_path_is_an_output_of_one_stage(stages, paths):
    outs = {name: _outs(s) for name, s in stages.items()}
    paths = dict(paths)
    head, finetuned = paths.pop("head"), paths.pop("finetuned")
    exported = paths.pop("exported")  # a folder: the export stage's graphs and sidecars
    assert paths.pop("hash_cache").startswith(".")  # a cache, not versioned data
    assert paths.pop("finetune_checkpoints").startswith(".")  # resumable state, not versioned
    paths.pop("report")  # the HTML report: written by `tlflow run` and `tlflow report`
    paths.pop("export")  # `tlflow export`'s graphs: remade from a model version, not a stage's
    paths.pop("new_images")  # the flow's judgement of a run's new images: not a stage's
    paths.pop("plots_page")  # DVC's plots drawn: written by `tlflow plots`
    expected = {
        "ingest": {paths["images"], paths["manifest"]},
        "extract": {paths["features"], paths["extract_report"], paths["extract_metrics"]},
        "train": {f"{head}.safetensors", f"{head}.json", paths["probe_metrics"],
                  paths["probe_report"], paths["sweep"], paths["strategy"],
                  paths["train_choice"], paths["compare_report"]},
        "finetune": {f"{finetuned}.safetensors", f"{finetuned}.json", paths["finetune_curve"]},
        "evaluate": {paths["eval_metrics"], paths["test_metrics"], paths["per_class"],
                     paths["confusion"],
                     paths["confusion_png"], paths["confusion_finetune"], paths["predictions"],
                     paths["coverage"]},
        "audit": {paths["duplicates"], paths["label_issues"], paths["balance"],
                  paths["audit_metrics"]},
        "export": {f"{exported}/{m}.{ext}" for m in ("probe", "finetuned")
                   for ext in ("onnx", "json")},
    }
    assert outs == expected


def test_each_stage_depends_on_the_data_it_reads(stages, paths):
    head, finetuned = paths["head"], paths["finetuned"]
    store = {paths["manifest"], paths["features"], paths["extract_report"]}
    data = {
        "ingest": set(),
        "extract": {paths["manifest"]},
        "train": store,
        # from train, only the values it uses: not the sweep, not the saved probe
        "finetune": {*store, paths["images"], paths["train_choice"]},
        "evaluate": {*store, paths["images"], f"{head}.safetensors", f"{head}.json",
                     f"{finetuned}.safetensors", f"{finetuned}.json"},
        # the codes and the probe's choice (layer, C): no image, no model
        "audit": {*store, paths["probe_report"]},
        # the models it exports (the probe's backbone is named in its sidecar)
        "export": {f"{head}.safetensors", f"{head}.json", f"{finetuned}.safetensors",
                   f"{finetuned}.json"},
    }
    for name, stage in stages.items():
        assert _deps(stage) == data[name], name  # no source file: the code is in the stamp


def test_each_stage_reads_its_own_code_entry(stages):
    """A stage's code is its entry of the stamp, and only its own: an edit of the probe code
    must not rerun extract."""
    for name, stage in stages.items():
        assert _params(stage, STAMP) == {name}, name


def test_code_entries_separate_decoding_from_probes():
    """The image decoder reruns extract, finetune and evaluate; the probe code does not
    rerun extract."""
    users = {name for name in STAGES if "tlflow.tasks.lib.data.decode" in stage_modules(name)}
    # ingest lists files, never decodes; export's sidecar describes the decoding (and its
    # read_batch decodes for a graph's user)
    assert users == {"extract", "finetune", "evaluate", "export"}
    assert "tlflow.tasks.lib.probe.sweep" in stage_modules("train")
    assert "tlflow.tasks.lib.probe.sweep" not in stage_modules("extract")


def test_params_are_exactly_what_each_stage_declares(stages):
    for name, stage in stages.items():
        declared = _params(stage)
        assert declared == set(importlib.import_module(f"tlflow.tasks.{name}").PARAMS), name


def test_metrics_and_plots_are_declared_for_dvc(stages, paths):
    """Metrics are the few numbers of metrics/; the details behind them (reports/) are plain
    git-tracked outputs, the per-class table and the curves are plots."""
    metrics = {str(o.def_path) for s in stages.values() for o in s.outs if o.metric}
    assert metrics == {paths["extract_metrics"], paths["probe_metrics"], paths["test_metrics"],
                       paths["audit_metrics"]}
    assert all(m.startswith("metrics/") for m in metrics)
    for key in ("extract_report", "probe_report", "strategy", "duplicates", "label_issues",
                "balance", "predictions", "eval_metrics"):
        out = next(o for s in stages.values() for o in s.outs if str(o.def_path) == paths[key])
        assert not out.metric and not out.plot and not out.use_cache, key
    per_class, csv, png, csv_finetune = [o for s in stages.values() for o in s.outs if o.plot]
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    assert top == [{"${base.paths.finetune_curve}": {
        "x": "epoch", "y": ["train_loss", "val_accuracy"],
        "title": "fine-tuning (train loss, val accuracy)"}}, {"${base.paths.coverage}": {
        "x": "coverage", "y": "accuracy", "template": "linear",
        "title": "accuracy on the images kept vs the share kept (min confidence 0.5, 0.8, "
                 "0.9, 0.95)"}},
        {"${base.paths.sweep}": {  # one line per layer: the layers extract computes codes of
            "x": "log10_C", "y": "${extract.layers}", "template": "simple",
            "title": "probe sweep (val accuracy per log10 C, one line per layer)",
            "y_label": "val accuracy"}}]
    assert paths["coverage"] in {str(o.def_path) for o in stages["evaluate"].outs}
    assert paths["finetune_curve"] in {str(o.def_path) for o in stages["finetune"].outs}
    assert paths["sweep"] in {str(o.def_path) for o in stages["train"].outs}
    assert str(per_class.def_path) == paths["per_class"]
    assert (per_class.plot["x"], per_class.plot["y"]) == ("probe_f1", "class")
    assert str(csv.def_path) == paths["confusion"]
    assert csv.plot["template"] == "confusion"
    assert str(png.def_path) == paths["confusion_png"]
    assert str(csv_finetune.def_path) == paths["confusion_finetune"]
    assert csv_finetune.plot["template"] == "confusion"
    assert Path(ROOT / "dvc.yaml").read_text().count("template: confusion") == 2


def test_every_output_persists(stages):
    """DVC deletes outputs that do not persist before it runs a stage: a failed `dvc repro`
    would leave none. tlflow's stages replace their outputs atomically themselves."""
    for name, stage in stages.items():
        assert all(o.persist for o in stage.outs), name
