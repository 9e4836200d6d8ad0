from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import load_params, parse_params


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
    from tlflow.tasks.lib.core.scope import UndeclaredParamError, scoped

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

    from tlflow.flows.stages import STAGES

    params = load_params(ROOT / "params.yaml").model_dump()
    for name in (*STAGES, "predict", "advise"):
        for key in importlib.import_module(f"tlflow.tasks.{name}").PARAMS:
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


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("manifest", "data", "base.paths.manifest: 'data' is a folder; it names a file"),
    ("head", "models",
     r"base.paths.head: 'models' is a folder; it names a file \(models.json\)"),
    ("features", "params.yaml", "base.paths.features: 'params.yaml' is a file; it names a "
                                "folder"),
    ("report", "params.yaml/report.html", "base.paths.report: .* lies under .*params.yaml, "
                                          "which is a file"),
])
def test_a_folder_where_a_file_goes_and_the_reverse_are_refused(tmp_path: Path, monkeypatch,
                                                                 key, value, needle):
    """Checked with the params, before any stage: an atomic rename onto a folder would fail
    only after the stage's work, with an IsADirectoryError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "models.json").mkdir()  # head: models.safetensors and models.json
    (tmp_path / "params.yaml").write_text("")
    raw = _raw()
    raw["base"]["paths"][key] = value
    with pytest.raises(TlflowError, match=needle):
        parse_params(raw)


BAD_EDITS = [  # (dotted key, value) -> the error names the key; one line, exit 2 in the CLI
    ("nope", 1), ("base.nope", 1), ("base.paths.nope", "x"), ("ingest.nope", 1),
    ("extract.nope", 1), ("train.nope", 1), ("finetune.nope", 1), ("advise.nope", 1),
    ("run.nope", 1), ("train.C_gird", [1.0]),
    ("base.seed", True), ("base.seed", "0"), ("base.seed", -1), ("base.seed", 1.5),
    ("extract.image_size", "64"), ("extract.image_size", True), ("extract.image_size", 4),
    ("extract.image_size", "big"), ("extract.batch_size", 0), ("extract.batch_size", "many"),
    ("extract.device", "tpu"), ("extract.dtype", "int8"), ("extract.precision", "fp8"),
    ("extract.layers", []), ("extract.layers", ["pooled", "pooled"]),
    ("extract.on_bad_image", "ignore"), ("extract.lock_timeout", -1),
    ("extract.lock_timeout", float("nan")),
    ("extract.executor", "spark"), ("extract.executor", True), ("extract.shard_size", 0),
    ("extract.shard_size", "4096"), ("extract.shard_size", 1.5),
    ("extract.dask_address", "localhost:8786"), ("extract.dask_address", 8786),
    ("extract.dask_address", "tcp://localhost"),
    ("extract.dask_workers", 0), ("extract.dask_workers", "2"),
    ("train.C_grid", [True]), ("train.C_grid", ["1"]), ("train.C_grid", [float("nan")]),
    ("train.C_grid", [float("inf")]), ("train.C_grid", [0.0]), ("train.C_grid", []),
    ("train.classifier", "forest"), ("train.normalize", "zscore"), ("train.cv", 1),
    ("train.max_iter", 0), ("train.buffer_rows", 1),
    ("finetune.lr", float("nan")), ("finetune.lr", -1.0), ("finetune.lr", "fast"),
    ("finetune.epochs", 0), ("finetune.hflip", 2.0), ("finetune.crop_scale", [0.5]),
    ("finetune.crop_scale", [1.0, 0.5]), ("finetune.trainable", "some"),
    ("finetune.enabled", "yes"), ("finetune.backbone_lr_ratio", float("inf")),
    ("finetune.nproc_per_node", 0), ("finetune.nproc_per_node", "2"),
    ("finetune.nnodes", 0), ("finetune.nnodes", True),
    ("finetune.rdzv_endpoint", "node0"), ("finetune.rdzv_endpoint", "node0:29400"),
    ("finetune.rdzv_endpoint", 29400),
    ("ingest.source", "web"), ("ingest.val_fraction", 1.0), ("ingest.test_fraction", -0.1),
    ("ingest.test_fraction", float("nan")), ("advise.strategy", "guess"),
    ("ingest.follow_symlinks", "yes"), ("ingest.follow_symlinks", 1),
    ("ingest.follow_symlinks", None),
    ("run.retries", -1), ("run.retries", True),
    ("audit.nope", 1), ("audit.duplicate_threshold", 0.0), ("audit.duplicate_threshold", 1.5),
    ("audit.duplicate_threshold", "high"), ("audit.folds", 1), ("audit.max_listed", -1),
    ("base.paths.report", "."), ("base.paths.report", "data/images/report.html"),
    ("base.paths.images", "."), ("base.paths.images", ".."),
    ("base.paths.finetune_checkpoints", "models"), ("base.paths.features", "data/images"),
]


@pytest.mark.parametrize(("key", "value"), BAD_EDITS)
def test_every_bad_edit_names_its_key(key, value):
    raw = _raw()
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(TlflowError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "\n" not in message, message
    named = {"base.paths.finetune_checkpoints": "base.paths.head"}.get(key, key)
    assert f"params.yaml: {named}" in message, message


@pytest.mark.parametrize(("text", "needle"), [
    ("base:\n  seed: 0\n  seed: 1\n", "duplicate key 'seed'"),
    ("base: [\n", "not valid YAML"),
    (b"base:\n  seed: \xff\n", "not UTF-8 text"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
])
def test_bad_params_files_are_one_line(tmp_path: Path, text, needle):
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TlflowError, match=needle) as err:
        load_params(path)
    assert "\n" not in str(err.value)
    with pytest.raises(TlflowError, match="a folder, not the params file"):
        load_params(tmp_path)
