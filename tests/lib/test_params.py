from pathlib import Path

import pytest
import yaml

from tasks.lib.errors import TlflowError
from tasks.lib.params import load_params, parse_params
from tests.conftest import ROOT


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.ingest.source == "digits"
    assert params.extract.layers[0] == "pooled" and len(params.extract.layers) >= 2
    assert params.train.classifier == "logistic"


def test_params_are_frozen():
    params = parse_params(_raw())
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen_instance"):
        params.train.max_iter = 3
    assert params.train.max_iter == 1000


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("train", "C_gird", [1.0], "train.C_gird: unknown key"),
        ("train", "C_grid", [0.0, 1.0], "train.C_grid: every C must be > 0"),
        ("extract", "batch_size", "many", "extract.batch_size"),
        ("extract", "device", "tpu", "extract.device"),
        ("ingest", "source", "s3", "ingest.source"),
        ("ingest", "test_fraction", 0.9, "ingest.test_fraction"),
        ("extract", "layers", [], "extract.layers"),
    ],
)
def test_bad_values_name_the_key(section, key, value, needle):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(TlflowError, match=None) as err:
        parse_params(raw)
    assert needle in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(TlflowError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("base: [unclosed\n")
    with pytest.raises(TlflowError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_a_check_across_keys_names_its_key():
    raw = _raw()
    raw["train"].update(classifier="sgd", cv=3)
    with pytest.raises(TlflowError, match=r"^params.yaml: train.cv: k-fold CV is for the"):
        parse_params(raw)


def test_a_stage_reads_only_what_it_declares():
    from tasks.lib.params import UndeclaredParamError, scoped

    params = load_params(ROOT / "params.yaml")
    view = scoped(params, ("base.seed", "train.max_iter", "finetune"))
    assert view.base.seed == params.base.seed
    assert view.base.paths == params.base.paths  # paths are deps/outs, always readable
    assert view.train.max_iter == params.train.max_iter
    assert view.finetune is params.finetune  # a whole section is the section itself
    with pytest.raises(UndeclaredParamError, match=r"train\.C_grid: read by a stage"):
        _ = view.train.C_grid
    with pytest.raises(UndeclaredParamError, match=r"^extract: read by a stage"):
        _ = view.extract
    with pytest.raises(AttributeError, match="read-only"):
        view.train = None


def test_every_stage_runs_with_what_it_declares():
    """Each stage's PARAMS name real keys (a typo would make dvc.yaml watch nothing)."""
    import importlib

    from flows.stages import STAGES

    params = load_params(ROOT / "params.yaml").model_dump()
    for name in (*STAGES, "predict", "advise"):
        for key in importlib.import_module(f"tasks.{name}").PARAMS:
            node = params
            for part in key.split("."):
                assert part in node, f"tasks/{name}.py PARAMS: unknown key {key}"
                node = node[part]


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("images", ".", "base.paths.images: '.' is the project root itself"),
    ("images", "..", "base.paths.images: '..' is the project root or a folder above it"),
    ("images", "data/..", "base.paths.images: 'data/..' is the project root or a folder"),
    ("finetune_checkpoints", "models",
     "base.paths.head: .*models/head.safetensors lies inside base.paths.finetune_checkpoints"),
    ("features", "data/images", "base.paths.features: .*data/images is also base.paths.images"),
    ("hash_cache", "features/hashes.sqlite",
     "base.paths.hash_cache: .* lies inside base.paths.features"),
    ("confusion", "metrics/eval.json",
     "base.paths.confusion: .*metrics/eval.json is also base.paths.eval_metrics"),
])
def test_paths_that_would_make_a_clean_up_delete_others_are_refused(key, value, needle):
    """Validated before anything is written: `images: .` once let ingest's clean-up delete
    the project; `finetune_checkpoints: models` let fine-tuning delete the saved models."""
    raw = _raw()
    raw["base"]["paths"][key] = value
    with pytest.raises(TlflowError, match=needle):
        parse_params(raw)
