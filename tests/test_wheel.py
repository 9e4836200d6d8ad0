"""The wheel built from this tree: it holds every module and data file of the package, and
installed into a fresh venv it is a working tlflow (and nothing named `flows` or `tasks`):
`tlflow init` makes a project elsewhere, `tlflow run` runs it, and an upgrade of tlflow's
installed code reruns exactly the stages whose code changed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, colour_images, run_cli
from tlflow.flows.stages import STAGES

# the repository's folders and where the wheel puts them (pyproject.toml: package-dir)
FOLDERS = {"tlflow": "tlflow", "flows": "tlflow/flows", "tasks": "tlflow/tasks"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of the files git tracks in this tree, copied apart (the test
    extra brings setuptools: no download): a build/ folder an earlier build left in the
    working tree would put modules that no longer exist into the wheel."""
    out = tmp_path_factory.mktemp("wheel")
    tree = tmp_path_factory.mktemp("tree")
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (ROOT / rel).is_file():  # a file deleted but not yet staged is not part of it
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(tree)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not re.search(r"deprecat", proc.stdout + proc.stderr, re.I), proc.stderr
    (path,) = out.glob("tlflow-*.whl")
    return path


def _package_files() -> set[str]:
    """Every file git tracks in the package's folders, as the wheel names it."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", *FOLDERS],
                            capture_output=True, text=True, check=True).stdout.split()
    out = set()
    for rel in listed:
        folder, _, rest = rel.partition("/")
        out.add(f"{FOLDERS[folder]}/{rest}")
    return out


def test_the_wheel_holds_every_module_and_data_file(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _package_files() - names
    assert not missing, f"missing from the wheel: {sorted(missing)} (pyproject.toml packages)"
    stale = {n for n in names if n.endswith(".py")} - _package_files()
    assert not stale, f"modules in the wheel that the tree does not hold: {sorted(stale)}"
    assert "tlflow/flows/templates/report.html.j2" in names
    assert "tlflow/flows/templates/project/params.yaml.j2" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tlflow"}, tops  # no `flows`, no `tasks`, no tests or benches


@pytest.fixture(scope="module")
def fresh(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding the wheel; its dependencies are this venv's (a .pth line), so the
    test needs no download. The editable install's finder is not loaded there (a .pth of a
    folder added by a .pth line is not read)."""
    root = tmp_path_factory.mktemp("fresh") / "venv"
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _env(fresh: Path, home: Path, api_url: str | None = None) -> dict[str, str]:
    env = cli_env(home, api_url)
    env["PATH"] = f"{fresh / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def _py(fresh: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(fresh / "bin" / "python"), "-c", code], cwd=cwd,
                          capture_output=True, text=True, env=_env(fresh, cwd))


@pytest.mark.slow
@pytest.mark.package
def test_the_installed_wheel_is_one_package(fresh: Path, tmp_path: Path):
    from tlflow import __version__

    for name in ("flows", "tasks"):
        proc = _py(fresh, f"import {name}", tmp_path)
        assert "ModuleNotFoundError" in proc.stderr, proc.stderr
    proc = _py(fresh, "import tlflow; print(tlflow.__version__, tlflow.__file__)", tmp_path)
    version, where = proc.stdout.split()
    assert version == __version__ and str(fresh) in where, proc.stderr
    every = ("import importlib, pkgutil, tlflow\n"
             "for m in pkgutil.walk_packages(tlflow.__path__, 'tlflow.'):\n"
             "    importlib.import_module(m.name)\n")
    proc = _py(fresh, every, tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(["tlflow", "--version"], tmp_path, _env(fresh, tmp_path))
    assert proc.stdout.strip() == f"tlflow {__version__}", proc.stdout + proc.stderr


def _status(root: Path, env: dict[str, str]) -> dict[str, str]:
    proc = run_cli(["tlflow", "status"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(line.split(None, 1) for line in proc.stdout.splitlines())


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.mark.slow
@pytest.mark.package
def test_a_project_of_ones_own_from_the_wheel(fresh: Path, tmp_path: Path,
                                              prefect_server: str):
    """init elsewhere, run, a second run skips every stage; an upgrade that changed the
    decoding reruns extract and not ingest, one that changed the probe reruns train onward
    and not extract; the report renders from the installed template."""
    env = _env(fresh, tmp_path, prefect_server)
    photos = colour_images(tmp_path / "photos")
    proc = run_cli(["tlflow", "init", "shop", "--images", str(photos)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "shop"
    proc = run_cli(["tlflow", "run"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test accuracy" in proc.stdout
    assert not list(root.rglob("*.py"))
    proc = run_cli(["tlflow", "run"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "│ ran " not in proc.stdout and proc.stdout.count("│ skipped ") == len(STAGES), \
        proc.stdout
    assert run_cli(["tlflow", "report"], root, env).returncode == 0
    _a_second_project_keeps_apart(tmp_path, photos, env, prefect_server)

    installed = Path(_py(fresh, "import tlflow; print(tlflow.__file__)", tmp_path)
                     .stdout.strip()).parent
    init = installed / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.'))
    _append(installed / "tasks" / "extract.py", "# a release whose extraction changed\n")
    status = _status(root, env)
    assert status["ingest"] == "up to date" and status["train"] == "up to date", status
    assert re.fullmatch(r"stale: tlflow's extract code changed \(\S+ → 9\.\S+\)",
                        status["extract"]), status
    proc = run_cli(["tlflow", "run"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(v == "up to date" for v in _status(root, env).values())

    _append(installed / "tasks" / "lib" / "probe" / "sweep.py", "# a release whose probe changed\n")
    status = _status(root, env)
    assert status["extract"] == "up to date" and status["ingest"] == "up to date", status
    assert {k for k, v in status.items() if v != "up to date"} == {
        "train", "finetune", "evaluate", "audit"}, status


def _a_second_project_keeps_apart(base: Path, photos: Path, env: dict[str, str],
                                  server: str) -> None:
    """Two projects on one Prefect server: each run is named and tagged after its project
    and each has its own `<project>-run-summary` artifact key."""
    import httpx

    assert run_cli(["tlflow", "init", "depot", "--images", str(photos)], base,
                   env).returncode == 0
    proc = run_cli(["tlflow", "run"], base / "depot", env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    keys = {a["key"] for a in httpx.post(f"{server}/artifacts/filter", json={},
                                         timeout=30).json()}
    assert {"shop-run-summary", "depot-run-summary", "depot-per-class"} <= keys, keys
    runs = httpx.post(f"{server}/flow_runs/filter", json={}, timeout=30).json()
    tagged = {r["name"].split()[0] for r in runs if {"project:shop", "project:depot"}
              & set(r["tags"])}
    assert tagged == {"shop", "depot"}, tagged
    assert not any("None" in r["name"] for r in runs)
