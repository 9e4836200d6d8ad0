"""`tlflow history`: one line per committed dvc.lock (the e2e test runs it on real commits)."""

from pathlib import Path

import pytest

from tests.conftest import make_params
from tlflow.flows import history
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.evaluate import Scores
from tlflow.tasks.lib.probe.head import HeadSidecar

HEAD = HeadSidecar(format="tlflow.linear_head/1", layer="pooled", extractor_id="e1",
                   classes=("a", "b"))


def _entry(rev: str, images: set[str], params: dict, acc: float) -> history.Entry:
    return history.Entry(rev, "2026-11-29T10:00:00+00:00", f"{rev}md5", frozenset(images),
                         f"{rev}model", HEAD, params,
                         {"probe": Scores(accuracy=acc, macro_f1=acc)})


def test_lines_say_what_changed_between_runs():
    header, *lines = history.lines([
        _entry("a1", {"x", "y"}, {"train.C_grid": [1.0]}, 0.9),
        _entry("b2", {"y", "z", "w"}, {"train.C_grid": [0.4]}, 0.95),
    ])
    assert header.split()[:4] == ["when", "rev", "data", "images"]
    assert "first run" in lines[0] and "  2  " in lines[0]
    assert "3 (+2 -1)" in lines[1] and "train.C_grid=[0.4]" in lines[1]
    assert "0.9500" in lines[1] and " e1 " in lines[1]
    assert lines[0].startswith("2026-11-29T10:00:00+00:00  a1 ")  # ISO time with its zone


def test_history_needs_git(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TlflowError, match="no git repository"):
        history.run(make_params(tmp_path))


def test_lines_fit_120_columns_and_wrap_the_params_that_changed():
    """With a fine-tuned network, a promotion and many changed params, every line fits 120
    columns; the params wrap under their column, none lost; empty columns are left out."""
    many = {f"finetune.key_{i}": [0.1 * i, 0.2 * i] for i in range(12)}
    first, second = (_entry("a1", {"x"}, {}, 0.9), _entry("b2", {"x", "y"}, many, 0.95))
    second = history.Entry(*[*vars(second).values()][:7],
                           {"probe": Scores(accuracy=0.95, macro_f1=0.9),
                            "finetune": Scores(accuracy=0.97, macro_f1=0.9)},
                           ("probe v0.0.2 (prod)",))
    out = history.lines([first, second])
    assert max(map(len, out)) <= history.WIDTH, "\n".join(out)
    assert "finetune" in out[0] and "promoted" in out[0]
    assert any("0.9700" in line and "probe v0.0.2 (prod)" in line for line in out)
    joined = " ".join(line.strip() for line in out)
    assert all(f"{k}={v}" in joined for k, v in many.items())
    plain = history.lines([first])
    assert "finetune" not in plain[0] and "promoted" not in plain[0]
