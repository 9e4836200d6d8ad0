"""`tlflow init`: a project of the user's own, and this repository is what it writes."""

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, cli_env, colour_images, run_cli
from tlflow.flows.project import (
    TEMPLATES,
    Source,
    init_project,
    render_dvc_yaml,
    render_params,
    source_of,
)
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Params, project_slug


def test_this_repository_is_what_init_writes():
    """The demo project and a user's project never drift: this repository's params.yaml and
    dvc.yaml are what `tlflow init` writes for a folder named tlflow with the digits. Fix a
    difference by editing flows/templates/project/ and running `tlflow init --force .`."""
    assert (ROOT / "params.yaml").read_text() == render_params("tlflow", Source("digits"))
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml()
    assert (ROOT / ".dvcignore").read_text() == (TEMPLATES / "dvcignore").read_text()


def test_the_source_is_filled_in_and_every_key_is_documented(tmp_path: Path):
    text = render_params("my-flowers", Source("folder", tmp_path / "a photo: #1"))
    raw = yaml.safe_load(text)
    assert raw["base"]["project"] == "my-flowers"
    assert raw["ingest"]["source"] == "folder"
    assert raw["ingest"]["path"] == str(tmp_path / "a photo: #1")  # quoted where it must be
    Params.model_validate(raw)
    body = text.split("\n\n", 1)[1]  # below the file's header, every key has its comment
    for line in body.splitlines():
        key = line.split("#", 1)[0].rstrip()
        if key.endswith(":") and key.strip() not in ("paths:",):
            continue  # a section's heading: its keys carry the comments
        if key and not line.lstrip().startswith("#"):
            above = text.splitlines()[text.splitlines().index(line) - 1].lstrip()
            assert "#" in line or above.startswith("#"), f"undocumented: {line!r}"


def test_project_names_are_slugs():
    assert project_slug("My Flowers_2") == "my-flowers-2"
    assert project_slug("...") == "project"
    with pytest.raises(ValueError, match="lowercase letters, digits and single dashes"):
        Params.model_validate({**yaml.safe_load(render_params("x", Source("digits"))),
                               "base": {"project": "My_Flowers", "paths": {}}})


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout


def test_init_writes_a_project_and_copies_no_code(tmp_path: Path, monkeypatch):
    images = colour_images(tmp_path / "photos", per_class=2)
    elsewhere = tmp_path / "a" / "b" / "c"  # the remote's url must not depend on the cwd
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    done = init_project(Path("../../../My Flowers"), Source("folder", images))
    root = tmp_path / "My Flowers"
    assert "git init" in done and "dvc init" in done
    assert not list(root.rglob("*.py"))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert raw["base"]["project"] == "my-flowers"
    assert raw["ingest"] == {**raw["ingest"], "source": "folder", "path": str(images)}
    assert (root / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    config = (root / ".dvc" / "config").read_text()
    assert "remote = local" in config
    assert "url = ../../my-flowers-remote\n" in config, config  # beside the project
    assert "/.tlflow/" in (root / ".gitignore").read_text()
    assert (root / "tlflow-code.yaml").is_file() and (root / "README.md").is_file()
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    for name in ("params.yaml", "dvc.yaml", "artifacts.yaml", "tlflow-code.yaml", ".gitignore",
                 "README.md", ".dvc/config"):
        assert name in status, status  # ready to add; nothing is committed
    assert subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                          capture_output=True).returncode != 0


def test_init_refuses_a_project_and_adds_to_what_is_there(tmp_path: Path):
    root = tmp_path / "p"
    root.mkdir()
    (root / ".gitignore").write_text("secrets/\n")
    init_project(root, Source("digits"))
    assert (root / ".gitignore").read_text().startswith("secrets/\n")  # added to, kept
    before = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(before + "# mine\n")
    proc = run_cli([str(BIN / "tlflow"), "init", str(root)], tmp_path, cli_env(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "params.yaml: already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (root / "params.yaml").read_text() == before + "# mine\n"
    config = (root / ".dvc" / "config").read_text()
    init_project(root, Source("digits"), force=True)
    assert (root / "params.yaml").read_text() == before
    assert (root / ".dvc" / "config").read_text() == config  # an existing .dvc: left as it is


def test_init_inside_a_git_repository_uses_dvc_subdir(tmp_path: Path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done = init_project(tmp_path / "vision" / "ants", Source("digits"))
    assert "git init" not in done and "dvc init --subdir" in done
    assert not (tmp_path / "vision" / "ants" / ".git").exists()
    assert "no_scm" not in (tmp_path / "vision" / "ants" / ".dvc" / "config").read_text()


def test_init_checks_the_source_before_writing(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"--images .*nope: not a folder"):
        source_of(tmp_path / "nope", None)
    proc = run_cli([str(BIN / "tlflow"), "init", "p", "--csv", "labels.csv"], tmp_path,
                   cli_env(tmp_path))
    assert proc.returncode == 2 and "--csv labels.csv: not a file" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_commit_on_request(tmp_path: Path):
    root = tmp_path / "p"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = run_cli([str(BIN / "tlflow"), "init", str(root), "--commit"], tmp_path,
                   {**cli_env(tmp_path), **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root)
    files = set(_git(root, "ls-files").split())
    assert {"params.yaml", "dvc.yaml", "tlflow-code.yaml", ".dvc/config"} <= files
    assert _git(root, "status", "--porcelain") == ""
