"""`tlflow promote` and the promoted model in `tlflow predict`, on a tiny committed project:
real git, DVC and GTO (tags; `gto show` run as its own command)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import BIN, cli_env, run_cli
from tests.lib.test_registry import build_project, git, run_and_commit, set_params
from tlflow.flows.cli import main

IMAGE = "data/images/red/00.png"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project(tmp_path_factory.mktemp("promote") / "project")


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the committed project, as the current directory."""
    root = Path(shutil.copytree(built, tmp_path / "project", symlinks=True))
    monkeypatch.chdir(root)
    return root


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_promote_then_predict_serves_it(project: Path, capsys):
    code, out, err = cli(capsys, "predict", IMAGE)
    assert code == 0 and "no model is assigned to prod" in err and "using the working tree's" \
        " probe" in err
    assert out.splitlines()[1].startswith(f"{IMAGE},red,")  # CSV on stdout
    head = git(project, "rev-parse", "HEAD").strip()
    code, out, _ = cli(capsys, "promote")
    assert code == 0
    assert out == f"promoted probe v0.0.1 ({head[:7]}) to prod: no model serves yet\n"
    code, out, err = cli(capsys, "predict", IMAGE)
    assert code == 0 and "no model is assigned" not in err
    assert f"(probe v0.0.1 ({head[:7]}) in prod)" in err
    assert out.splitlines()[1].startswith(f"{IMAGE},red,")
    code, out, _ = cli(capsys, "promote")
    assert code == 0 and out.startswith("not promoted: HEAD is already in prod")


def test_worse_candidate_stays_out_until_forced(project: Path, capsys):
    assert cli(capsys, "promote")[0] == 0
    _, served, _ = cli(capsys, "predict", IMAGE)
    # a probe that barely fits (C tiny, no standardization) scores worse on the same val split
    set_params(project, train={"C_grid": [1e-6], "normalize": "none"})
    worse = run_and_commit(project, ("train",), "worse")
    code, out, _ = cli(capsys, "promote")
    assert code == 0
    assert out.startswith("not promoted: val accuracy ") and "the serving model stays" in out
    assert "; probe v0.0.1 (" in out and out.endswith(") stays in prod\n")
    # predict keeps serving v0.0.1, read at its commit; the working tree has the worse probe
    assert cli(capsys, "predict", IMAGE)[1] == served
    assert "in prod" not in cli(capsys, "predict", IMAGE, "--model", "probe")[2]
    code, out, _ = cli(capsys, "promote", "--force")
    assert code == 0
    assert out.startswith(f"promoted probe v0.0.2 ({worse[:7]}) to prod: forced (--force)")
    assert f"(probe v0.0.2 ({worse[:7]}) in prod)" in cli(capsys, "predict", IMAGE)[2]
    env = cli_env(project)
    show = run_cli([str(BIN / "gto"), "show", "probe"], project, env, timeout=1800)
    assert show.returncode == 0, show.stderr
    rows = [r for r in show.stdout.splitlines() if "probe@" in r]
    assert len(rows) == 2 and "v0.0.2" in rows[0] and "prod" in rows[0]
    assert "v0.0.1" in rows[1] and "prod" not in rows[1]
    assert {"probe@v0.0.1", "probe@v0.0.2", "probe#prod#1", "probe#prod#2"} <= set(
        git(project, "tag").split())


def test_promote_refuses_an_uncommitted_run(project: Path, tmp_path: Path, capsys):
    lock = project / "dvc.lock"
    lock.write_text(lock.read_text() + "\n")
    code, out, err = cli(capsys, "promote")
    assert code == 2 and not out
    assert err.startswith("error: dvc.lock: differs from HEAD") and err.count("\n") == 1
    git(project, "checkout", "-q", "dvc.lock")
    head = project / "models" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-4])
    code, _, err = cli(capsys, "promote")
    assert code == 2 and err.startswith("error: models/head.safetensors: modified since dvc.lock")
    assert "probe@" not in git(project, "tag")
    # outside a git repo, through the installed command
    bare = tmp_path / "bare"
    shutil.copytree(project, bare, ignore=shutil.ignore_patterns(".git"))
    proc = run_cli([str(BIN / "tlflow"), "promote"], bare, cli_env(tmp_path), timeout=1800)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a git repo" in proc.stderr
