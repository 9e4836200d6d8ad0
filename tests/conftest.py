"""Shared fixtures: tiny generated images, params for them, and a copy of the project."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tlflow.tasks.lib.core.params import Params, params_under

# The suite needs no network: hubs answer "offline" at once instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Importing dvc installs logging handlers bound to the sys.stdout of that moment. Import it
# now, while that is the session's stream, and not first inside a test whose captured stream
# is closed after it (a later test's in-process `dvc commit` would then log to a closed file).
import dvc  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# the real photos (ants and bees) beside the repository; tests that claim accuracy on them skip
# without it (a fresh clone elsewhere), naming the folder
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
BIN = Path(sys.executable).parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are skipped where there is no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 24) -> Path:
    """A small noisy image of one dominant colour (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def colour_images(root: Path, per_class: int = 12) -> Path:
    """root/<class>/<image>: three colour classes, `per_class` small noisy images each."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            write_image(root / name / f"{i:02d}.png", colour, seed=100 * c + i)
    return root


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """The hymenoptera photos (245 train, 153 val), or a skip naming the missing folder."""
    if not (HYMENOPTERA / "train").is_dir() or not (HYMENOPTERA / "val").is_dir():
        pytest.skip(f"needs the hymenoptera photos at {HYMENOPTERA} (not found)")
    return HYMENOPTERA


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/<class>/<image>: three colour classes, 12 images each."""
    return colour_images(tmp_path / "src")


def colour_project(base: Path, **sections: dict) -> Path:
    """A git + DVC project at base/project reading the colour images at base/src (pooled codes
    at 32 px, fp32), each given params section updated; nothing run yet. fp32: the tests on
    it check the pipeline's mechanics with a probe scored on 5 test images of noise, which
    bf16 codes at 32 px (auto on a CPU with AMX or AVX512-BF16) score 0.8 instead of 1.0;
    bf16's accuracy is checked on real images (tests/test_accuracy.py)."""
    root = copy_project(base / "project")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(colour_images(base / "src")))
    raw["extract"].update(layers=["pooled"], image_size=32, precision="fp32")
    for name, values in sections.items():
        raw[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def make_params(tmp_path: Path, **sections: dict) -> Params:
    """Params for a project rooted in tmp_path, overriding sections as given."""
    return params_under(tmp_path, ROOT / "params.yaml", **sections)


PROJECT_FILES = ("params.yaml", "dvc.yaml", "artifacts.yaml", ".dvcignore", ".dvc/config",
                 ".dvc/.gitignore")


def copy_project(dest: Path) -> Path:
    """The project's pipeline files (no code: the stages are the installed tlflow) in a fresh
    git repo at dest."""
    for rel in PROJECT_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run([*git, "-C", str(dest), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(dest), "commit", "-qm", "init"], check=True)
    return dest


def cli_env(tmp_path: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for running `tlflow` and `dvc` from the test's venv, offline. Without
    `api_url`, a flow run starts Prefect's temporary server (the default a new user gets);
    with it (the `prefect_server` fixture), runs report to that server."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    env.pop("PREFECT_API_URL", None)
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `predicate` until it returns something true; fail after `timeout` seconds, or as
    soon as `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One real `prefect server start` on a free loopback port for the whole test run (what a
    bigger user points PREFECT_API_URL at); its URL. Sharing it spares every flow run in the
    suite the start of a temporary server (about 7 s each on 2 cores)."""
    import httpx

    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    env = {**cli_env(home), "PREFECT_HOME": str(home / ".prefect"),
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_ENABLED": "false"}
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 600, "the Prefect server", proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 1800):
    """Run a command, capturing its output. The timeout only ends a hung test: a busy
    machine must never trip it (timing belongs in bench/)."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
