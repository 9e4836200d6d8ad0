"""Scores and the confusion matrix files."""

import csv
from pathlib import Path

import numpy as np
import pytest

from tasks.lib.evaluation import score, write_confusion


def test_score_on_known_predictions():
    y_true = np.array(["a", "a", "b", "b"])
    y_pred = np.array(["a", "b", "b", "b"])
    m = score(y_true, y_pred, ("a", "b"))
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5,
                                   "f1-score": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_confusion_csv_has_one_row_per_image(tmp_path: Path):
    write_confusion(tmp_path / "c.csv", np.array(["a", "b"]), np.array(["b", "b"]))
    with open(tmp_path / "c.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"actual": "a", "predicted": "b"}, {"actual": "b", "predicted": "b"}]
