"""Each hand-off file has one typed reader and writer; a missing or malformed one is one
line naming the file and the stage that writes it."""

import json
from pathlib import Path

import pytest

from tlflow.tasks.lib import handoff
from tlflow.tasks.lib.errors import TlflowError


def test_round_trips(tmp_path: Path):
    report = handoff.ExtractReport("e1", 3, ({"relpath": "a.png", "sha256": "s", "reason": "r"},))
    handoff.write_extract_report(tmp_path / "extract.json", report)
    assert handoff.read_extract_report(tmp_path / "extract.json") == report
    assert report.bad == {"s": "r"}

    store = tmp_path / "features" / "e1.h5"
    cand = handoff.Candidate("timm/b", "packaged", "e1", 64, {"pooled": 8}, 0.5, 1000)
    handoff.write_pointer(tmp_path / "features", store, {"backbone": "b"}, (cand,))
    assert handoff.current_store(tmp_path / "features") == store
    assert handoff.read_candidates(tmp_path / "features") == (cand,)
    assert cand.store(tmp_path / "features") == store
    store.touch()
    assert handoff.chosen_store(tmp_path / "features", "e1", tmp_path / "h.json") == store
    with pytest.raises(TlflowError, match="names the codes of extractor e2, which"):
        handoff.chosen_store(tmp_path / "features", "e2", tmp_path / "h.json")

    choice = handoff.TrainChoice(0.1, None, "timm/b", "packaged", "e1", 64)
    handoff.write_train_choice(tmp_path / "choice.json", choice)
    assert handoff.read_train_choice(tmp_path / "choice.json") == choice

    handoff.write_probe_report(tmp_path / "probe.json", {"C": 1.0}, [], [])
    assert handoff.read_probe_report(tmp_path / "probe.json")["best"] == {"C": 1.0}
    sweep = [{"layer": "pooled", "C": 10.0, "val_accuracy": 0.5},
             {"layer": "pooled", "C": 0.1, "val_accuracy": 0.25},
             {"layer": "blocks.4", "C": 0.1, "val_accuracy": 0.75}]
    handoff.write_sweep(tmp_path / "sweep.csv", sweep)  # a DVC plot: a column per layer
    assert (tmp_path / "sweep.csv").read_text().splitlines() == [
        "C,log10_C,pooled,blocks.4", "0.1,-1,0.25,0.75", "10,1,0.5,"]
    handoff.write_probe_metrics(tmp_path / "m.json", {"C": 1.0, "layer": "l",
                                                      "val_accuracy": 0.5, "val_set": "x"})
    assert json.loads((tmp_path / "m.json").read_text()) == {"C": 1.0, "layer": "l", "acc": 0.5}

    per_class = {"a": {"precision": 1.0, "recall": 0.5, "f1-score": 2 / 3, "support": 2}}
    scores = {"probe": {"accuracy": 1.0, "macro_f1": 0.5, "n": 2, "per_class": per_class},
              "finetune": {"accuracy": 0.5, "macro_f1": 0.25, "n": 2, "per_class": per_class}}
    handoff.write_eval_metrics(tmp_path / "eval.json", scores)
    assert handoff.read_eval_metrics(tmp_path / "eval.json") == {
        "probe": {"accuracy": 1.0, "macro_f1": 0.5, "n": 2},
        "finetune": {"accuracy": 0.5, "macro_f1": 0.25}}  # numbers only, n said once
    assert json.loads((tmp_path / "eval.json").read_text()) == {  # short names: DVC's columns
        "probe": {"accuracy": 1.0, "macro_f1": 0.5, "n": 2},
        "finetune": {"accuracy": 0.5, "macro_f1": 0.25}}
    nested = {"probe": {"accuracy": 0.9, "macro_f1": 0.8, "n": 3}}  # as runs before them wrote
    assert handoff.parse_eval_metrics(json.dumps(nested), tmp_path / "old.json") == nested
    handoff.write_per_class(tmp_path / "per_class.csv", scores)
    rows = handoff.read_per_class(tmp_path / "per_class.csv")
    assert [r["model"] for r in rows] == ["probe", "finetune"]
    assert rows[0] == {"model": "probe", "class": "a", "precision": 1.0, "recall": 0.5,
                       "f1-score": 0.666667, "support": 2}


def test_the_same_object_gives_the_same_bytes(tmp_path: Path):
    choice = handoff.TrainChoice(1.0, "probe", "timm/b", "packaged", "e1", 64)
    handoff.write_train_choice(tmp_path / "a.json", choice)
    handoff.write_train_choice(tmp_path / "b.json", choice)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize(("reader", "name", "stage"), [
    (handoff.read_extract_report, "extract.json", "extract"),
    (handoff.read_probe_report, "probe.json", "train"),
    (handoff.read_strategy, "strategy.json", "train"),
    (handoff.read_train_choice, "train_choice.json", "train"),
    (handoff.read_eval_metrics, "eval.json", "evaluate"),
])
def test_missing_or_malformed_names_the_file_and_its_stage(tmp_path: Path, reader, name,
                                                           stage):
    path = tmp_path / name
    with pytest.raises(TlflowError, match=rf"{name}: not found \(written by the {stage} stage"):
        reader(path)
    path.write_text("{not json")
    with pytest.raises(TlflowError, match=rf"{name}: not valid JSON .*the {stage} stage"):
        reader(path)
    path.write_text("[1, 2]")
    with pytest.raises(TlflowError, match=rf"{name}: expected a JSON object with keys"):
        reader(path)


def test_missing_pointer_names_extract(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"current.json: not found \(written by the extract"):
        handoff.current_store(tmp_path)


def test_a_missing_or_malformed_per_class_table_names_its_stage(tmp_path: Path):
    path = tmp_path / "per_class.csv"
    with pytest.raises(TlflowError, match=r"per_class.csv: not found \(written by the evaluate"):
        handoff.read_per_class(path)
    path.write_text("class,support,probe_precision\na,x,1\n")
    with pytest.raises(TlflowError, match=r"per_class.csv: not a per-class table"):
        handoff.read_per_class(path)
