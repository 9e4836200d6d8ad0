"""Scheduling against a real Prefect server on 127.0.0.1: serve, deploy, retries, artifacts."""

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import BIN, COLOURS, cli_env, copy_project, wait_for, write_image

pytestmark = pytest.mark.slow


@pytest.fixture
def server(prefect_server: str) -> str:
    return prefect_server


def _completed_runs(url: str, deployment: str) -> list[dict]:
    """The completed flow runs of one deployment (the server is shared by the whole suite)."""
    body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
            "deployments": {"name": {"any_": [deployment]}}}
    return httpx.post(f"{url}/flow_runs/filter", json=body, timeout=10).json()


def _project(root: Path, images: Path) -> Path:
    copy_project(root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(images))
    raw["extract"].update(layers=["pooled"], image_size=32)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _colours(root: Path, n: int, start: int = 0) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(start, start + n):
            write_image(root / name / f"{i:02d}.png", colour, seed=100 * c + i)
    return root


def test_served_runs_take_the_source_as_it_is_now(server: str, tmp_path: Path):
    images = _colours(tmp_path / "src", 12)
    root = _project(tmp_path / "project", images)
    # the runner polls for due runs every 2 s, not Prefect's default 10: the same code, less
    # waiting in the suite
    env = {**cli_env(tmp_path), "PREFECT_API_URL": server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    out = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    serve = subprocess.Popen([str(BIN / "tlflow"), "serve", "--interval", "10", "--name",
                              "served-test"], cwd=root,
                             env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        runs = lambda: len(_completed_runs(server, "served-test"))  # noqa: E731
        wait_for(lambda: runs() >= 1, 900, "a first completed run", serve)
        _colours(images, 1, start=50)  # one new image per class
        wait_for(lambda: runs() >= 2, 900, "a second completed run", serve)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        out.close()
    log = (tmp_path / "serve.log").read_text()
    assert "extract: 36 computed, 0 cached" in log, log[-3000:]
    assert "extract: 3 computed, 36 cached" in log, log[-3000:]  # only the new images
    assert (root / "models/head.safetensors").is_file()

    artifacts = httpx.post(f"{server}/artifacts/filter", json={}, timeout=10).json()
    keys = {a["key"] for a in artifacts}
    assert {"tlflow-run-summary", "tlflow-per-class", "tlflow-strategy"} <= keys
    summary = [a for a in artifacts if a["key"] == "tlflow-run-summary"]
    assert any("3 added, 0 removed" in a["data"] for a in summary)


def test_deploy_creates_a_deployment_on_a_work_pool(server: str, tmp_path: Path):
    root = _project(tmp_path / "project", _colours(tmp_path / "src", 4))
    env = {**cli_env(tmp_path), "PREFECT_API_URL": server}
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "tlflow-test", "--type",
                    "process"], env=env, check=True, capture_output=True, timeout=1800)
    proc = subprocess.run([str(BIN / "tlflow"), "deploy", "--pool", "tlflow-test", "--cron",
                           "0 3 * * *", "--name", "nightly"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deployments = httpx.post(f"{server}/deployments/filter", json={}, timeout=10).json()
    (dep,) = [d for d in deployments if d["name"] == "nightly"]
    assert dep["work_pool_name"] == "tlflow-test"
    assert dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

    proc = subprocess.run([str(BIN / "tlflow"), "deploy", "--pool", "no-such-pool"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_transient_failures_are_retried_bad_input_is_not(server: str, tmp_path: Path,
                                                         monkeypatch):
    """A stage that fails once with an OSError is retried and succeeds; a bad params value
    fails once, without a retry. Real Prefect task retries, real DVC freshness."""
    from prefect import flow
    from prefect.exceptions import FailedRun
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tlflow.flows import pipeline as pl

    root = _project(tmp_path / "project", _colours(tmp_path / "src", 12))
    monkeypatch.chdir(root)
    calls: list[str] = []
    hiccups = [OSError("transient: the disk hiccuped")]  # the first call only
    real = pl.stage_runner

    def flaky(name: str):
        run = real(name)

        def go(params):
            calls.append(name)
            if hiccups:
                raise hiccups.pop()
            return run(params)

        return go

    monkeypatch.setattr(pl, "stage_runner", flaky)
    stage = pl.run_stage.with_options(retries=2, retry_delay_seconds=0,
                                      retry_condition_fn=pl._not_bad_input)

    @flow
    def one_stage():
        return stage("ingest", return_state=True)

    with temporary_settings({PREFECT_API_URL: server}):
        state = one_stage()
        assert state.is_completed() and calls == ["ingest", "ingest"]
        assert (root / "data/manifest.csv").is_file()

        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["ingest"]["path"] = str(tmp_path / "gone")
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        calls.clear()
        with pytest.raises(FailedRun, match="gone does not exist"):
            one_stage()
        # send this process's queued run logs while the server still listens (not at exit)
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    assert calls == ["ingest"]  # failed once, not retried
    assert (root / "data/manifest.csv").is_file()  # the last good manifest stays
