"""What changed between two runs: the pure functions of tasks/lib/assess/changes.py on small
tables."""

from __future__ import annotations

from tlflow.tasks.lib.assess.changes import class_deltas, data_changes, image_changes
from tlflow.tasks.lib.core.handoff.evaluate import ClassScores, ImagePrediction
from tlflow.tasks.lib.data.manifest import Row


def _p(relpath: str, sha: str, label: str, pred: str, loss: float,
       model: str = "probe") -> ImagePrediction:
    return ImagePrediction(model=model, relpath=relpath, sha256=sha, label=label, top=(pred,),
                           scores=(0.9,), kind="probability", loss=loss, correct=pred == label)


def _c(model: str, label: str, recall: float, support: int) -> ClassScores:
    return ClassScores(model=model, label=label, precision=1.0, recall=recall, f1=1.0,
                       support=support)


def test_class_deltas_pair_the_rows_and_keep_classes_of_either_run():
    then = [_c("probe", "a", 0.5, 4), _c("probe", "gone", 1.0, 2)]
    now = [_c("probe", "a", 0.75, 4), _c("probe", "new", 0.0, 1), _c("finetune", "a", 1.0, 4)]
    rows = {(d.model, d.label): d for d in class_deltas(then, now)}
    assert [(d.model, d.label) for d in class_deltas(then, now)] == [
        ("probe", "a"), ("probe", "new"), ("finetune", "a"), ("probe", "gone")]
    assert rows["probe", "a"].delta == 0.25
    assert rows["probe", "new"].then is None and rows["probe", "new"].delta is None
    assert rows["probe", "gone"].now is None and rows["probe", "gone"].support_then == 2
    assert rows["finetune", "a"].delta is None  # the fine-tuned network did not run then


def test_image_changes_match_bytes_and_label_and_put_the_worst_first():
    then = [_p("x.png", "1", "a", "a", 0.1), _p("y.png", "2", "a", "a", 0.2),
            _p("z.png", "3", "b", "a", 2.0), _p("w.png", "4", "b", "a", 0.7),
            _p("relabelled.png", "5", "a", "a", 0.1), _p("gone.png", "6", "a", "b", 3.0)]
    now = [_p("x.png", "1", "a", "b", 0.9), _p("y-renamed.png", "2", "a", "b", 1.5),
           _p("z.png", "3", "b", "b", 0.1), _p("w.png", "4", "b", "b", 0.1),
           _p("relabelled.png", "5", "b", "a", 2.0), _p("new.png", "7", "a", "b", 3.0),
           _p("x.png", "1", "a", "a", 0.1, model="finetune")]
    (probe,) = image_changes(then, now)  # the fine-tuned network has nothing to compare with
    assert probe.model == "probe" and probe.common == 4
    assert [c.now.relpath for c in probe.newly_wrong] == ["y-renamed.png", "x.png"]
    assert [c.now.relpath for c in probe.newly_right] == ["z.png", "w.png"]
    assert probe.newly_wrong[0].then.relpath == "y.png"
    assert image_changes([], now) == ()


def test_data_changes_count_added_and_removed_by_class_and_split():
    then = [Row("a/1.png", "1", "a", "train"), Row("a/2.png", "2", "a", "test"),
            Row("b/3.png", "3", "b", "train"), Row("b/4.png", "4", "b", "val"),
            Row("c/5.png", "5", "c", "train")]
    now = [Row("a/1-renamed.png", "1", "a", "train"),  # renamed: neither
           Row("b/2.png", "2", "b", "test"),  # relabelled a -> b
           Row("b/3.png", "3", "b", "test"),  # moved to another split: neither
           Row("b/3-copy.png", "3", "b", "train"),  # a second copy: added
           Row("c/5.png", "5", "c", "train"), Row("c/6.png", "6", "c", "val")]
    got = {c.label: (c.added, c.removed) for c in data_changes(then, now)}
    assert got == {"a": ({}, {"test": 1}), "b": ({"test": 1, "train": 1}, {"val": 1}),
                   "c": ({"val": 1}, {})}
    assert data_changes(then, then) == []
