"""What Prefect's API shows of a no-op `tlflow run` on a real server: skipped stages in a
"Skipped" state with the reason, the run tagged with the git revision and the data version,
artifacts whose descriptions carry the accuracy, the confusion matrix as an image."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import cli_env, run_cli
from tests.flows.test_cli_conventions import small_project
from tlflow.flows.stages import STAGES


@pytest.fixture(scope="module")
def noop_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: str):
    """A project whose stages are all recorded, one `tlflow run` on it, and what the server
    holds of that run: (root, flow run, task runs by stage, artifacts by key)."""
    root = small_project(tmp_path_factory.mktemp("states"))
    proc = run_cli(["tlflow", "run"], root, cli_env(root, prefect_server))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = re.search(r"Beginning flow run '([^']+)' for flow 'tlflow-pipeline'", proc.stderr)
    assert name, proc.stderr

    def post(path: str, body: dict) -> list[dict]:
        response = httpx.post(f"{prefect_server}/{path}/filter", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    (flow_run,) = post("flow_runs", {"flow_runs": {"name": {"any_": [name[1]]}}})
    ids = {"id": {"any_": [flow_run["id"]]}}
    tasks = {t["name"]: t for t in post("task_runs", {"flow_runs": ids})}
    artifacts = {a["key"]: a for a in post("artifacts",
                                           {"artifacts": {"flow_run_id": {"any_": [
                                               flow_run["id"]]}}})}
    return root, flow_run, tasks, artifacts


def test_skipped_stages_are_not_plain_completed(noop_run):
    _, _, tasks, _ = noop_run
    assert set(tasks) == set(STAGES)
    # a folder source is rescanned on every run; finding nothing new, ingest is Skipped too
    for name in STAGES:
        state = tasks[name]["state"]
        assert state["type"] == "COMPLETED" and state["name"] == "Skipped", state
        assert "up to date" in state["message"]
    assert "rescanned, nothing changed" in tasks["ingest"]["state"]["message"]


def test_the_flow_run_is_tagged_with_git_revision_and_data_version(noop_run):
    root, flow_run, _, _ = noop_run
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=True).stdout.strip()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"]
               if o["path"] == "data/manifest.csv")
    assert {f"git:{rev}", f"data:{md5[:8]}", "project:tlflow"} <= set(flow_run["tags"])
    assert flow_run["name"].startswith("tlflow 20"), flow_run["name"]  # project and time


def test_artifact_descriptions_carry_the_accuracy(noop_run):
    root, _, _, artifacts = noop_run
    assert set(artifacts) >= {"tlflow-run-summary", "tlflow-per-class", "tlflow-confusion",
                              "tlflow-strategy"}
    for key in ("tlflow-run-summary", "tlflow-per-class", "tlflow-confusion"):
        assert "probe 1.0000 (+0.0000)" in artifacts[key]["description"], artifacts[key]
    confusion = artifacts["tlflow-confusion"]
    assert confusion["type"] == "markdown" and "](data:image/png;base64," in confusion["data"]
    strategy = artifacts["tlflow-strategy"]
    assert "not carried out" in strategy["description"]  # advise.strategy: manual
    assert "plan not carried out" in strategy["data"]
    assert Path(root / "plots/confusion.png").stat().st_size < 200_000
