"""The `tlflow` command in-process: features info and gc on a small project."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, cli_env, copy_project, run_cli
from tlflow.flows.cli import main
from tlflow.tasks.lib.core.handoff.extract import current_store
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.features.store import info


@pytest.fixture
def project(tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(image_folder))
    raw["extract"].update(layers=["pooled"], image_size=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["stage", "ingest"]) == 0 and main(["stage", "extract"]) == 0
    return tmp_path


def test_features_info(project: Path, capsys: pytest.CaptureFixture):
    capsys.readouterr()
    assert main(["features", "info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["rows"] == 36 and facts["layers"] == {"pooled": 1280}
    assert main(["features", "info"]) == 0
    assert "rows:      36" in capsys.readouterr().out


def test_features_gc(project: Path, image_folder: Path, capsys: pytest.CaptureFixture):
    (image_folder / "red" / "00.png").unlink()
    assert main(["stage", "ingest"]) == 0
    capsys.readouterr()
    assert main(["features", "gc", "--dry-run"]) == 0
    assert "kept 35 rows, would remove 1" in capsys.readouterr().out
    assert main(["features", "gc"]) == 0
    assert "kept 35 rows, removed 1" in capsys.readouterr().out
    store = current_store(Path("features"))
    assert info(store)["rows"] == 35
    assert len(read_manifest(Path("data/manifest.csv"))) == 35


def test_features_info_on_a_missing_store(project: Path, capsys: pytest.CaptureFixture):
    assert main(["features", "info", "nope.h5"]) == 2
    assert "nope.h5: feature store not found" in capsys.readouterr().err


def test_cli_exits_2_without_traceback(tmp_path: Path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["bogus"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for args in (["tlflow", "stage", "train"], ["tlflow", "run"]):
        proc = run_cli(args, tmp_path, cli_env(tmp_path), timeout=1800)
        assert proc.returncode == 2, proc.stderr
        assert "train.bogus: unknown key" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_unknown_stage(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = run_cli(["tlflow", "stage", "fly"], tmp_path, cli_env(tmp_path))
    assert proc.returncode == 2 and "unknown stage 'fly'" in proc.stderr


def test_run_outside_a_dvc_project_says_so(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = run_cli(["tlflow", "run"], tmp_path, cli_env(tmp_path))
    assert proc.returncode == 2 and ".dvc: not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_needs_a_schedule_and_commands_need_a_dvc_project(tmp_path: Path, monkeypatch,
                                                                 capsys):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2 and "--cron" in capsys.readouterr().err
    for args in (["serve", "--interval", "60"], ["status"], ["deploy", "--pool", "p"]):
        assert main(args) == 2
        assert ".dvc: not found" in capsys.readouterr().err
    assert main(["history"]) == 2
    assert "no git repository" in capsys.readouterr().err


def test_a_project_without_git_is_one_line(tmp_path: Path, monkeypatch, capsys):
    """A project unpacked from an archive has no .git: DVC refuses, and tlflow says so in one
    line with what to do (exit 2), for status and for a flow run alike."""
    import shutil

    root = copy_project(tmp_path / "project")
    shutil.rmtree(root / ".git")
    monkeypatch.chdir(root)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a git repository" in err and "git init" in err


def test_reports_say_when_their_stages_are_stale(tmp_path: Path, image_folder: Path,
                                                 monkeypatch, capsys):
    """features info (and predict of the working tree's models) never describe old data
    silently: a stale stage is named on stderr, with how to refresh it."""
    from tlflow.flows.stages import commit

    root = copy_project(tmp_path / "project")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(image_folder))
    raw["extract"].update(layers=["pooled"], image_size=32)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)
    for stage in ("ingest", "extract"):
        assert main(["stage", stage]) == 0
        commit(stage)
    capsys.readouterr()
    assert main(["features", "info"]) == 0
    assert "stale" not in capsys.readouterr().err
    raw["extract"]["layers"] = ["pooled", "blocks.2"]
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["features", "info"]) == 0
    err = capsys.readouterr().err
    assert "features info: stage extract is stale (params: extract)" in err
    assert "`tlflow run` brings it up to date" in err
