"""Reproducible outputs: the same inputs and seed give the same bytes, run after run.

Its own module (not tests/flows/test_pipeline.py) so that, with the suite's one module per
worker, it runs beside the pipeline's module fixture rather than after it."""

from pathlib import Path

import pytest

from tests.conftest import cli_env, colour_project, run_cli

pytestmark = pytest.mark.slow


def test_two_forced_runs_write_identical_files(tmp_path: Path, prefect_server: str):
    """Reproducible outputs under `tlflow run` (Prefect's client threads included): the same
    inputs and seed on CPU give the same bytes, fine-tuned network and curve included."""
    root = colour_project(tmp_path, finetune={"enabled": True, "epochs": 2, "batch_size": 8})
    env = cli_env(tmp_path, prefect_server)
    outputs = ["models/head.safetensors", "models/head.json", "models/train_choice.json",
               "models/finetuned.safetensors", "models/finetuned.json", "plots/finetune.csv",
               "plots/confusion.csv", "plots/confusion.png", "plots/per_class.csv",
               "metrics/probe.json", "metrics/eval.json", "metrics/extract.json",
               "reports/probe.json", "reports/strategy.json", "reports/extract.json",
               "data/manifest.csv"]
    runs = []
    for _ in range(2):
        proc = run_cli(["tlflow", "run", "--force"], root, env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs.append({f: (root / f).read_bytes() for f in outputs})
    assert [f for f in outputs if runs[0][f] != runs[1][f]] == []
