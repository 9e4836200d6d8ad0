"""What DVC shows of a run: `dvc metrics show` fits a terminal with the headline up front,
the registered metrics hold numbers (no booleans for `dvc metrics diff` to print as -1), and
the details live in reports/ and plots/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli_env, colour_project, run_cli
from tlflow.tasks import evaluate, extract, finetune, ingest, train
from tlflow.tasks.lib.core.handoff.audit import write_audit_metrics
from tlflow.tasks.lib.core.handoff.evaluate import EvalMetrics, write_test_metrics
from tlflow.tasks.lib.core.handoff.extract import ExtractReport, write_extract_metrics
from tlflow.tasks.lib.core.handoff.train import ProbeChoice, write_probe_metrics
from tlflow.tasks.lib.core.params import params_under

WIDTH = 120  # columns a terminal gives `dvc metrics show`


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """A committed project of 36 colour images, its stages run once, in this process."""
    tmp = tmp_path_factory.mktemp("dvc_metrics")
    root = colour_project(tmp)
    params = params_under(root, root / "params.yaml")
    for stage in (ingest, extract, train, finetune, evaluate):  # the audit's file: written below
        stage.run(params)
    return root, params, cli_env(tmp)


def _metrics_show(root: Path, env: dict[str, str]) -> list[str]:
    proc = run_cli(["dvc", "metrics", "show"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items()
                for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def test_metrics_show_fits_and_leads_with_the_test_accuracy(project):
    root, _, env = project
    lines = _metrics_show(root, env)
    assert max(map(len, lines)) <= WIDTH, "\n".join(lines)
    columns = re.split(r"\s{2,}", lines[0].strip())
    assert "acc" in columns[:3] and "f1" in columns, columns
    test = next(line for line in lines if line.startswith("metrics/test.json"))
    eval_json = json.loads((root / "metrics/eval.json").read_text())  # scripts' file: all
    assert float(test.split()[columns.index("acc")]) == round(eval_json["probe"]["accuracy"], 5)
    assert not any(line.startswith("metrics/eval.json") for line in lines)


def test_metrics_still_fit_with_a_fine_tuned_network(project):
    """The fine-tuned network adds its accuracy and macro F1 (ft_acc, ft_f1), with every
    metric as wide as a real run makes it (DVC prints 5 decimals): still WIDTH columns."""
    root, params, env = project
    paths = params.base.paths
    files = (paths.extract_metrics, paths.probe_metrics, paths.test_metrics,
             paths.audit_metrics)
    before = [p.read_bytes() if p.is_file() else None for p in files]
    long = 0.9655172413793104
    try:
        write_extract_metrics(paths.extract_metrics,
                              ExtractReport(extractor_id="x", images=12345, bad_images=()))
        write_probe_metrics(paths.probe_metrics, ProbeChoice(
            classifier="logistic", val_accuracy=long, C=0.001, layer="blocks.4",
            extractor_id="x"))
        model = {"accuracy": long, "macro_f1": long, "n": 1234, "ece": long, "ece_t": long}
        write_test_metrics(paths.test_metrics,
                           EvalMetrics.from_scores({"probe": model, "finetune": model}))
        write_audit_metrics(paths.audit_metrics, {"near_duplicates": 123, "label_issues": 456})
        lines = _metrics_show(root, env)
    finally:
        for p, b in zip(files, before, strict=True):
            if b is None:
                p.unlink()
            else:
                p.write_bytes(b)
    assert max(map(len, lines)) <= WIDTH, "\n".join(lines)
    assert {"ft_acc", "ft_f1"} <= set(lines[0].split())


def test_metrics_hold_numbers_and_at_most_a_few_short_strings(project):
    root, _, _ = project
    paths = params_under(root, root / "params.yaml").base.paths
    registered = [Path(next(iter(m)).replace("${base.paths.", "").rstrip("}"))
                  for s in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
                  for m in s.get("metrics", [])]
    registered = [getattr(paths, str(key)) for key in registered]
    assert [p.name for p in registered] == ["extract.json", "probe.json", "test.json",
                                            "audit.json"]
    for rel in registered:
        rel = root / rel
        if not rel.is_file():  # the audit's: written by another test
            continue
        leaves = _leaves(json.loads(rel.read_text()))
        assert 1 <= len(leaves) <= 6, (rel.name, leaves)
        strings = {k: v for k, v in leaves.items() if isinstance(v, str)}
        assert len(strings) <= 1 and all(len(v) <= 40 for v in strings.values()), strings
        for key, value in leaves.items():
            assert isinstance(value, (int, float, str)) and not isinstance(value, bool), \
                (rel.name, key, value)


def test_the_details_are_reports_and_plots(project):
    """The sweep, the advice and the unreadable images are git-tracked reports; the
    per-class table is a plot `dvc plots show` draws."""
    root, params, env = project
    paths = params.base.paths
    assert {"best", "layers", "sweep"} <= set(json.loads(paths.probe_report.read_text()))
    assert "evidence" in json.loads(paths.strategy.read_text())
    assert "bad_images" in json.loads(paths.extract_report.read_text())
    proc = run_cli(["dvc", "plots", "show", "--json"], root, env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    assert {"plots/per_class.csv", "plots/finetune.csv", "plots/confusion.csv",
            "plots/sweep.csv"} <= set(shown["data"])


def test_tlflow_plots_draws_dvc_plots_offline(project):
    """`tlflow plots`: DVC's plots drawn to inline SVG (the per-class bars, the confusion
    matrix, the probe's sweep) and its image (the confusion PNG) on a page that loads
    nothing: no script, no http(s) source; the plots DVC has no rows for (fine-tuning off)
    are left out."""
    root, params, env = project
    proc = run_cli(["tlflow", "plots"], root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = Path(proc.stdout.strip())
    assert (root / page).resolve() == params.base.paths.plots_page.resolve()
    html = (root / page).read_text()
    figures = dict(re.findall(r'<figure class="plot" data-plot="([^"]+)">(.*?)</figure>',
                              html, re.S))
    assert set(figures) == {"plots/per_class.csv", "plots/confusion.csv",
                            "plots/confusion.png", "plots/sweep.csv",
                            "plots/coverage.csv"}, list(figures)
    for name in ("plots/per_class.csv", "plots/confusion.csv", "plots/sweep.csv",
                 "plots/coverage.csv"):
        svg = figures[name]
        assert "<svg" in svg and svg.count("<path") + svg.count("<rect") > 3, name
    assert ">blue<" in figures["plots/confusion.csv"]  # the classes label its axes
    assert ">val accuracy<" in figures["plots/sweep.csv"]
    assert '<img src="data:image/png;base64,' in figures["plots/confusion.png"]
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
