"""Interrupts and environment faults of `tlflow run`: SIGTERM or SIGINT to the run's process
group stops it with one line and 128 + the signal, the flow run Cancelled on the server and
the last good outputs kept; a Prefect API nothing answers at is one line, exit 2, at once."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, cli_env, colour_images, colour_project, run_cli, wait_for


def _digest(root: Path) -> str:
    files = sorted(p for d in ("models", "metrics") for p in (root / d).rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def _flow_run_states(url: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), \
            get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    return [r.state.name for r in sorted(runs, key=lambda r: r.created)]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Path:
    """A project after a first good `tlflow run` (base/project, its images in base/src), run
    once for the module: each test interrupts a copy of it."""
    base = tmp_path_factory.mktemp("interrupts")
    root = colour_project(base, extract={"image_size": 224, "batch_size": 8})
    first = run_cli([str(BIN / "tlflow"), "run"], root, cli_env(base, prefect_server))
    assert first.returncode == 0, first.stderr[-2000:]
    return base


@pytest.mark.faults  # an interrupted run and its last good outputs: `make faults`
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_group_stops_the_run_cancelled_with_one_line(tmp_path, prefect_server,
                                                                     good_run, sig):
    shutil.copytree(good_run / "project", tmp_path / "project", symlinks=True)
    shutil.copytree(good_run / "src", tmp_path / "src")
    root = tmp_path / "project"
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"]["path"] = str(tmp_path / "src")  # the copy's own images
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**cli_env(tmp_path, prefect_server), "PREFECT_HOME": str(tmp_path / ".prefect")}
    before = _digest(root)
    colour_images(tmp_path / "src", per_class=80)  # many more images: extract takes a while
    log = open(tmp_path / "run.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(BIN / "tlflow"), "run"], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "extract: " in (tmp_path / "run.txt").read_text(), 600,
                 "extract to start", proc)
        time.sleep(3)
        os.killpg(proc.pid, sig)
        rc = proc.wait(120)  # generous: the budget of 10 s is measured in bench/faults.py
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "run.txt").read_text()
    assert rc == 128 + sig, out[-3000:]
    assert "Traceback" not in out
    assert [line for line in out.splitlines() if line.startswith("interrupted: ")], out[-2000:]
    assert _digest(root) == before  # the last good run's models and metrics
    assert _flow_run_states(prefect_server)[-1] == "Cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the run's group is left


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/api", "http://no-such-host.invalid/api",
                                 "not a url"])
def test_an_unreachable_prefect_api_is_one_line_at_once(tmp_path, url):
    root = colour_project(tmp_path)
    env = {**cli_env(tmp_path), "PREFECT_API_URL": url}
    t0 = time.monotonic()
    proc = run_cli([str(BIN / "tlflow"), "run"], root, env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "PREFECT_API_URL" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60  # generous; 'at once' is a few seconds (bench/faults.py)
    assert not (root / "data").exists()  # nothing ran


@pytest.mark.parametrize("variable", ["HOME", "PREFECT_HOME"])
def test_an_unwritable_prefect_home_is_one_line_at_once(tmp_path, variable):
    """No PREFECT_API_URL: the temporary server needs PREFECT_HOME (default ~/.prefect). A
    HOME under a file (missing; a read-only one fails the same check, EROFS) is one line
    naming the variable, exit 2, before any stage."""
    root = colour_project(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = cli_env(tmp_path)
    if variable == "HOME":
        env.pop("PREFECT_HOME")
        env["HOME"] = str(blocker / "home")
    else:
        env["PREFECT_HOME"] = str(blocker / ".prefect")
    proc = run_cli([str(BIN / "tlflow"), "run"], root, env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {variable}: "), proc.stderr
    assert "PREFECT_HOME to a writable folder" in lines[0] and "Traceback" not in proc.stderr
    assert not (root / "data").exists()  # nothing ran


def test_identical_files_each_named_in_the_reports(tmp_path):
    """Empty files and one file under two labels: every stage runs (here in this process, as
    `dvc repro` runs them), and `tlflow report` names each copy."""
    from tlflow.flows.stages import STAGES, stage_runner
    from tlflow.tasks.lib.core.params import params_under

    root = colour_project(tmp_path)
    src = tmp_path / "src"
    for name in ("empty0.png", "empty1.png"):
        (src / "red" / name).write_bytes(b"")
    (src / "blue" / "empty2.png").write_bytes(b"")
    (src / "blue" / "copy.png").write_bytes((src / "red" / "00.png").read_bytes())  # two labels
    params = params_under(root, root / "params.yaml")
    for stage in STAGES:
        stage_runner(stage)(params)
    report = run_cli([str(BIN / "tlflow"), "report"], root, cli_env(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    paths = yaml.safe_load((root / "params.yaml").read_text())["base"]["paths"]
    extract = yaml.safe_load((root / paths["extract_report"]).read_text())
    assert sorted(b["relpath"] for b in extract["bad_images"]) == \
        ["blue/empty2.png", "red/empty0.png", "red/empty1.png"]
    dups = yaml.safe_load((root / paths["duplicates"]).read_text())
    conflict = {i["relpath"] for g in dups["label_conflicts"]["groups"] for i in g["images"]}
    assert {"blue/copy.png", "red/00.png"} <= conflict
    listed = {i["relpath"] for g in dups["identical_files"]["groups"] for i in g["images"]}
    assert {"blue/empty2.png", "red/empty0.png", "red/empty1.png", "blue/copy.png",
            "red/00.png"} <= listed
    page = (root / paths["report"]).read_text()
    assert "blue/copy.png" in page and "red/empty1.png" in page


def _scheduled(url: str, name: str) -> tuple[str | None, int]:
    """The deployment's id and how many of its runs are Scheduled (None, 0 before it exists)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), \
            get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(f"tlflow-pipeline/{name}")
        except ObjectNotFound:
            return None, 0
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    return str(dep.id), sum(r.state.type.value == "SCHEDULED" for r in runs)


@pytest.mark.slow
def test_stopping_serve_leaves_no_scheduled_run_and_restarting_reuses_it(tmp_path,
                                                                         prefect_server):
    root = colour_project(tmp_path)
    env = cli_env(tmp_path, prefect_server)
    name = f"serve-{tmp_path.name}"
    ids = []
    for _ in range(2):
        proc = subprocess.Popen([str(BIN / "tlflow"), "serve", "--interval", "3600", "--name",
                                 name], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for(lambda: _scheduled(prefect_server, name)[1] > 0, 300,
                     "serve to schedule runs", proc)
            os.killpg(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
        dep, scheduled = _scheduled(prefect_server, name)
        assert scheduled == 0
        ids.append(dep)
    assert ids[0] == ids[1]  # one deployment, served again
