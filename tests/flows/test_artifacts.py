"""The run summary and per-class table published as Prefect artifacts."""

from pathlib import Path

from tests.conftest import make_params
from tlflow.flows.artifacts import Snapshot, per_class_rows, summary_markdown
from tlflow.flows.pipeline import StageResult
from tlflow.tasks.lib.core.handoff.evaluate import ClassScores, Scores

METRICS = {"probe": Scores(accuracy=0.9, macro_f1=0.8, n=10)}


def test_summary_compares_with_the_previous_run(tmp_path: Path):
    paths = make_params(tmp_path).base.paths
    before = Snapshot("aaa", frozenset({"x", "y"}), {"probe": Scores(accuracy=0.8,
                                                                     macro_f1=0.7)})
    after = Snapshot("bbb", frozenset({"y", "z", "w"}), METRICS)
    results = [StageResult("ingest", True, "forced", 1.0),
               StageResult("extract", False, "up to date", 0.0)]
    text = summary_markdown("tlflow", paths, before, after, results)
    assert "manifest `bbb`, 3 images (2 added, 1 removed since the previous run)" in text
    assert "| ingest | ran | forced | 1.0 |" in text
    assert "| extract | skipped | up to date | 0.0 |" in text
    assert "probe: test accuracy 0.9000 (+0.1000), macro F1 0.8000 (+0.1000)" in text
    failed = summary_markdown("tlflow", paths, before, after, results, failed="train: bad")
    assert "**Failed** at train: bad" in failed


def test_per_class_rows_are_rounded():
    rows = (ClassScores(model="probe", label="a", precision=1.0, recall=0.8, f1=0.888888,
                        support=5),)
    assert per_class_rows(rows) == [{"model": "probe", "class": "a", "precision": 1.0,
                                        "recall": 0.8, "f1": 0.8889, "support": 5}]


def test_a_project_without_a_manifest_has_no_data_version(tmp_path: Path):
    assert Snapshot.take(make_params(tmp_path).base.paths) == Snapshot(None)


def test_summary_says_which_input_size_was_used_and_why(tmp_path: Path):
    from tlflow.tasks.lib.core.handoff.extract import ExtractReport

    paths = make_params(tmp_path).base.paths
    ExtractReport(extractor_id="e1", images=3, bad_images=(), image_size=64,
                  image_size_why="auto: the images are tiny (median side 8 px < 224 / 8)"
                  ).write(paths.extract_report)
    after = Snapshot("bbb", frozenset({"x"}), METRICS)
    text = summary_markdown("tlflow", paths, Snapshot(None), after, [])
    assert "- input size: 64 px (auto: the images are tiny (median side 8 px" in text
