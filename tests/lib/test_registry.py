"""The promotion rule (a pure function, table-driven) and the GTO registry on a tiny committed
project: real git, real DVC, real GTO tags."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, colour_images, copy_project
from tlflow.flows.cli import main
from tlflow.flows.stages import commit
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import load_params
from tlflow.tasks.lib.models import registry
from tlflow.tasks.lib.probe.head import load_head

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
STAGES = ("ingest", "extract", "train", "finetune")  # finetune off: it writes its sidecar only

# --- the rule -------------------------------------------------------------------------------

SAME = {"extractor_id": "e1", "val_set": "v1", "classes": ["a", "b"]}


@pytest.mark.parametrize(
    ("current", "candidate", "margin", "promoted", "why"),
    [
        (None, {**SAME, "val_accuracy": 0.5}, 0.0, True, "no model serves yet"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_accuracy": 0.1}, None, True,
         "promotion check off"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_accuracy": 0.9}, 0.0, True,
         "0.9000 >= serving 0.9000"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_accuracy": 0.95}, 0.0, True, ">="),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_accuracy": 0.89}, 0.0, False,
         "the serving model stays"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_accuracy": 0.89}, 0.02, True,
         "margin 0.02"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_accuracy": 0.8}, 0.05, False,
         "< serving 0.9000 - margin 0.05"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "extractor_id": "e2", "val_accuracy": 0.1},
         0.0, True, "other extractor_id: not comparable"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "val_set": "v2", "val_accuracy": 0.1}, 0.0,
         True, "other val_set"),
        ({**SAME, "val_accuracy": 0.9}, {**SAME, "classes": ["a"], "val_accuracy": 0.1}, 0.0,
         True, "other classes"),
    ],
)
def test_promotion_rule(current, candidate, margin, promoted, why):
    terms = registry.Terms.model_validate
    yes, reason = registry.promotion(current and terms(current), terms(candidate), margin)
    assert yes is promoted
    assert why in reason


def test_artifacts_yaml_is_derived_from_params():
    """GTO 1.x reads artifacts.yaml; its paths are base.paths' (regenerate with --write)."""
    paths = load_params(ROOT / "params.yaml").base.paths
    assert yaml.safe_load((ROOT / registry.INDEX).read_text()) == registry.artifacts_index(paths)
    assert registry.artifacts_index(paths)["probe"]["path"] == f"{paths.head}.safetensors"


def test_unknown_artifact_is_refused():
    paths = load_params(ROOT / "params.yaml").base.paths
    with pytest.raises(TlflowError, match="unknown artifact 'resnet'"):
        registry.model_files(paths, "resnet")


# --- a tiny committed project ---------------------------------------------------------------


@contextmanager
def inside(root: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old)


def git(root: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout


def set_params(root: Path, **sections: dict) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in sections.items():
        raw[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def run_and_commit(root: Path, stages: tuple[str, ...], message: str) -> str:
    """Run the stages in this process, record them in dvc.lock, git commit; HEAD's sha."""
    with inside(root):
        for stage in stages:
            assert main(["stage", stage]) == 0
        for stage in stages:
            commit(stage)
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD").strip()


def build_project(root: Path) -> Path:
    """36 colour images, pooled codes at 32 px, the probe trained; run and artifacts.yaml
    committed; git's identity set for GTO's tags."""
    src = colour_images(root.parent / "src")
    copy_project(root)
    shutil.copy2(ROOT / registry.INDEX, root / registry.INDEX)
    (root / ".gitignore").write_text("/.tlflow/\n")
    git(root, "config", "user.name", "t")
    git(root, "config", "user.email", "t@t")
    set_params(root, ingest={"source": "folder", "path": str(src)},
               extract={"layers": ["pooled"], "image_size": 32})
    run_and_commit(root, STAGES, "run")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project(tmp_path_factory.mktemp("registry") / "project")


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the committed project (its git repo and DVC cache) for one test."""
    return Path(shutil.copytree(built, tmp_path / "project", symlinks=True))


def _paths(root: Path):
    return load_params(root / "params.yaml").base.paths


def test_gto_round_trip(project: Path, tmp_path: Path):
    paths, head = _paths(project), git(project, "rev-parse", "HEAD").strip()
    assert registry.serving(project, "probe") is None
    outcome = registry.promote(project, paths, 0.0, "probe")
    assert outcome.promoted and outcome.why == "no model serves yet"
    assert {"probe@v0.0.1", "probe#prod#1"} <= set(git(project, "tag").split())
    served = registry.serving(project, "probe")
    assert (served.version, served.rev) == ("v0.0.1", head)
    assert registry.promoted(project) == served
    # the version's files, read at its commit through dvc.api, are the working tree's head
    dest = tmp_path / "fetched"
    dest.mkdir()
    fetched = load_head(registry.fetch_model(project, paths, served, dest))
    local = load_head(project / paths.head)
    np.testing.assert_array_equal(fetched.weight, local.weight)
    assert fetched.meta == local.meta
    again = registry.promote(project, paths, 0.0, "probe")
    assert not again.promoted and "already in prod" in registry.describe(again)


def test_a_new_run_is_a_new_version(project: Path):
    paths = _paths(project)
    registry.promote(project, paths, 0.0, "probe")
    set_params(project, train={"C_grid": [0.1, 1.0]})
    rev = run_and_commit(project, ("train",), "retrain")
    outcome = registry.promote(project, paths, 0.0, "probe")
    assert outcome.promoted, outcome.why
    assert (outcome.serving.version, outcome.serving.rev) == ("v0.0.2", rev)
    assert registry.serving(project, "probe").version == "v0.0.2"


def test_refusals(project: Path, tmp_path: Path):
    paths = _paths(project)
    (project / "dvc.lock").write_text((project / "dvc.lock").read_text() + "\n")
    with pytest.raises(TlflowError, match=r"^dvc.lock: differs from HEAD"):
        registry.promote(project, paths, 0.0, "probe")
    git(project, "checkout", "-q", "dvc.lock")
    sidecar = project / f"{paths.head}.json"
    sidecar.write_text(sidecar.read_text() + " ")
    with pytest.raises(TlflowError, match=r"^models/head.json: modified since dvc.lock"):
        registry.promote(project, paths, 0.0, "probe")
    with pytest.raises(TlflowError, match="no trained finetuned model"):
        registry.promote(project, paths, 0.0, "finetuned")
    (tmp_path / "bare").mkdir()
    with pytest.raises(TlflowError, match="not a git repo"):
        registry.head_rev(tmp_path / "bare")
    assert registry.promoted(tmp_path / "bare") is None


def test_undeclared_artifact_is_refused(project: Path):
    git(project, "rm", "-q", registry.INDEX)
    git(project, "commit", "-qm", "no index")
    with pytest.raises(TlflowError, match=r"^artifacts.yaml: not committed at HEAD"):
        registry.promote(project, _paths(project), 0.0, "probe")
    index = registry.artifacts_index(_paths(project))
    index["probe"]["path"] = "elsewhere.safetensors"
    (project / registry.INDEX).write_text(yaml.safe_dump(index))
    git(project, "add", registry.INDEX)
    git(project, "commit", "-qm", "moved")
    with pytest.raises(TlflowError, match=r"probe declared at elsewhere\.safetensors"):
        registry.promote(project, _paths(project), 0.0, "probe")
