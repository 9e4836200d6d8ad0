"""The `tlflow` command follows the shell's conventions: --version, `status -q`, data on stdout
and messages on stderr, quiet broken pipes, unreadable images skipped, `history --json`.

One small project for the module (36 colour images, pooled codes at 32 px), its stages run in
this process and recorded in dvc.lock as the flow records them; commands that are about the
process itself (exit status, pipes) run as subprocesses.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import COLOURS, cli_env, colour_project, run_cli, write_image
from tlflow.flows.cli import main
from tlflow.flows.stages import STAGES, commit

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
VERSIONED = ("dvc.lock", "params.yaml", "metrics", "plots", ".gitignore", "data/.gitignore",
             "models/.gitignore", "features/.gitignore")


def git_commit(root: Path, message: str) -> None:
    """Commit a run as the README says: dvc.lock, params, metrics, plots, DVC's .gitignores."""
    subprocess.run([*GIT, "-C", str(root), "add",
                    *(p for p in VERSIONED if (root / p).exists())], check=True)
    subprocess.run([*GIT, "-C", str(root), "commit", "-qm", message], check=True)


def small_project(base: Path) -> Path:
    """A git + DVC project on 36 small colour images, every stage run in this process and
    recorded in dvc.lock (what `tlflow run` does, without Prefect), the run committed."""
    root = colour_project(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in STAGES:
            assert main(["stage", name]) == 0
            commit(name)
    git_commit(root, "first versioned run")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = small_project(tmp_path_factory.mktemp("conventions"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield root


def test_version_prints_the_package_version(tmp_path: Path):
    from importlib.metadata import version

    proc = run_cli(["tlflow", "--version"], tmp_path, cli_env(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == f"tlflow {version('tlflow')}"


def test_every_subcommand_help_has_a_description(capsys):
    for args in (["status"], ["history"], ["predict"], ["features", "info"], ["run"]):
        with pytest.raises(SystemExit):
            main([*args, "--help"])
        usage, _, rest = capsys.readouterr().out.partition("\n\n")
        assert usage.startswith("usage: tlflow") and rest.split("\n")[0][:1].isupper(), rest


def test_status_quiet_exit_codes(project: Path, capsys):
    capsys.readouterr()
    assert main(["status", "-q"]) == 0  # up to date
    original = (project / "params.yaml").read_text()
    raw = yaml.safe_load(original)
    raw["train"]["C_grid"] = [0.5]
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert main(["status", "-q"]) == 1  # train is stale
    finally:
        (project / "params.yaml").write_text(original)
    assert main(["status", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_predict_writes_only_csv_rows_to_stdout(project: Path):
    proc = run_cli(["tlflow", "predict", "data/images"], project, cli_env(project))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["path", "label_1", "probability_1", "prediction", "confidence",
                       "novel"] and len(rows) == 37
    assert all(Path(row[0]).parent.name == row[1] == row[3] for row in rows[1:])  # colour: easy
    assert {row[5] for row in rows[1:]} <= {"true", "false"}
    assert "predict: 36 images, 36 codes from the store, 0 computed" in proc.stderr


def test_a_closed_pipe_ends_quietly(project: Path):
    env = cli_env(project)
    head = run_cli(["bash", "-c", "tlflow predict data/images | head -2"], project, env)
    assert head.returncode == 0 and len(head.stdout.splitlines()) == 2
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr, head.stderr
    # `true` exits before tlflow writes: the write always meets a closed pipe
    closed = run_cli(["bash", "-c", "tlflow features info --json | true; "
                                    "echo ${PIPESTATUS[0]} >&2"], project, env)
    assert closed.stderr.strip() == "141", closed.stderr  # 128 + SIGPIPE, as the shell's own


def test_predict_skips_an_unreadable_image_and_strict_fails(project: Path, tmp_path: Path,
                                                            capsys):
    new = tmp_path / "new"
    write_image(new / "red.png", COLOURS["red"], seed=4242)
    write_image(new / "blue.png", COLOURS["blue"], seed=4243)
    (new / "broken.png").write_bytes(b"not a png at all")
    capsys.readouterr()
    assert main(["predict", str(new), "--model", "probe"]) == 0
    out, err = capsys.readouterr()
    assert [r["path"] for r in csv.DictReader(io.StringIO(out))] == [
        str(new / "blue.png"), str(new / "red.png")]
    assert re.search(r"predict: skipped .*broken\.png: cannot read image", err), err
    assert "2 images, 0 codes from the store, 2 computed, 1 unreadable skipped" in err
    assert main(["predict", str(new), "--model", "probe", "--strict"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "broken.png: cannot read image" in err and "--strict" in err


def test_history_json_and_table(project: Path, capsys):
    assert main(["promote"]) == 0  # GTO tags HEAD: probe v0.0.1 in prod
    capsys.readouterr()
    assert main(["history", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"]
               if o["path"] == "data/manifest.csv")
    assert run["data_version"] == md5[:8] and run["images"] == 36
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", run["when"]), run
    assert run["probe_accuracy"] == 1.0 and run["finetune_accuracy"] is None
    assert run["promotions"] == ["probe v0.0.1 (prod)"] and run["params_changed"] is None
    assert main(["history"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["when", "rev", "data"] and "promoted" in header
    assert md5[:8] in line and "probe v0.0.1 (prod)" in line and "first run" in line


def test_compare_without_a_comparison_says_how_to_ask(project: Path, capsys):
    capsys.readouterr()
    assert main(["compare"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "list backbones in params.yaml extract.compare" in err
    assert main(["compare", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"compared": False}
