"""Scores, per-image predictions and the confusion matrix files."""

import csv
from pathlib import Path

import numpy as np
import pytest

from tlflow.tasks.lib.assess.evaluation import image_predictions, losses, score, write_confusion
from tlflow.tasks.lib.core.handoff.evaluate import Predictions
from tlflow.tasks.lib.data.manifest import Row


def test_score_on_known_predictions():
    y_true = np.array(["a", "a", "b", "b"])
    y_pred = np.array(["a", "b", "b", "b"])
    m = score(y_true, y_pred, ("a", "b"))
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5,
                                   "f1-score": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_confusion_csv_has_one_row_per_image_with_its_path(tmp_path: Path):
    write_confusion(tmp_path / "c.csv", np.array(["a", "b"]), np.array(["b", "b"]),
                    ["x/1, \"odd\".png", "y/2.png"])
    with open(tmp_path / "c.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"actual": "a", "predicted": "b", "relpath": "x/1, \"odd\".png"},
                    {"actual": "b", "predicted": "b", "relpath": "y/2.png"}]


def test_losses_cross_entropy_and_hinge():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert losses(p, np.array([0, 0]), "probability") == pytest.approx(
        [-np.log(0.7), -np.log(0.1)])
    assert losses(p, np.array([-1, 2]), "probability")[0] == pytest.approx(-np.log(1e-12))
    s = np.array([[2.0, 0.5, -1.0], [0.0, 0.3, 0.1]])  # decision values
    assert losses(s, np.array([0, 2]), "decision") == pytest.approx([0.0, 1.2])


def test_image_predictions_round_trip(tmp_path: Path):
    rows = [Row("a/1.png", "h1", "a", "test"), Row("b/2.png", "h2", "b", "test")]
    scores = np.array([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3]])
    preds = image_predictions("probe", rows, scores, ("a", "b", "c"), "probability", k=2)
    assert [p.correct for p in preds] == [True, False]
    assert preds[1].top == ("a", "c") and preds[1].scores == (0.5, 0.3)
    assert preds[1].loss == pytest.approx(-np.log(0.2))
    Predictions(rows=tuple(preds), k=2).write(tmp_path / "p.csv")
    back = Predictions.read(tmp_path / "p.csv").rows
    assert [(b.relpath, b.top, b.correct, b.kind) for b in back] == \
        [(p.relpath, p.top, p.correct, p.kind) for p in preds]
    assert back[1].loss == pytest.approx(preds[1].loss, rel=1e-5)
