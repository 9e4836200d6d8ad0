"""Each hand-off file has one pydantic model, written and read by the same class; a missing or
malformed one is one line naming the file, the key and the stage that writes it."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff import audit, base, evaluate, extract, finetune, flow, train

# the package's models and helpers under one name, as the tests below spell them
handoff = SimpleNamespace(**{k: v for m in (base, extract, train, evaluate, finetune, audit, flow)
                             for k, v in vars(m).items() if not k.startswith("__")})

IMAGE = {"relpath": "a/1.png", "sha256": "s1", "label": "a", "split": "val"}
TRAIN_IMAGE = {"relpath": "a/2.png", "sha256": "s2", "label": "a", "split": "train"}
ROW = {"layer": "pooled", "dim": 8, "C": 1.0, "val_accuracy": 0.5}
CHOICE = {"classifier": "logistic", "layer": "pooled", "C": 1.0, "val_accuracy": 0.5,
          "extractor_id": "e1", "val_set": "v", "backbone": "timm/b", "weights": "packaged",
          "input_size": 64}

# one instance of every model, as its stage writes it
EXAMPLES = [
    handoff.Pointer(extractor_id="e1", store="e1.h5", extractor={"backbone": "b"},
                    candidates=(handoff.Candidate(
                        backbone="timm/b", weights="packaged", extractor_id="e1",
                        input_size=64, dims={"pooled": 8}, gflops=0.5, parameters=1000),)),
    handoff.ExtractReport(extractor_id="e1", images=3,
                          bad_images=({"relpath": "a.png", "sha256": "s", "reason": "r"},)),
    handoff.ProbeReport(best=CHOICE, layers=(ROW,), sweep=(ROW, {**ROW, "C": 0.1})),
    handoff.Strategy(size="small", similarity="similar", plan="probe",
                     evidence={"size": {"classes": 2}}, carried_out=True),
    handoff.TrainChoice(pooled_C=0.1, plan=None, backbone="timm/b", weights="packaged",
                        extractor_id="e1", input_size=64),
    handoff.CompareReport(compared=False),
    handoff.CompareReport(compared=True, rule="r", winner="timm/b", winner_extractor_id="e1",
                          rows=({"backbone": "timm/b", "extractor_id": "e1", "input_size": 64,
                                 "code_dim": 8, "layer": "pooled", "C": 1.0,
                                 "val_accuracy": 0.5, "n_val": 4, "val_se": 0.25,
                                 "test_accuracy": None, "images_per_s": 10.0, "gflops": 0.5,
                                 "parameters": 1000, "store_mb": 0.1},)),
    handoff.EvalMetrics(probe={"accuracy": 1.0, "macro_f1": 0.5, "n": 2, "ece": 0.1,
                               "ece_t": 0.05},
                        finetune={"accuracy": 0.5, "macro_f1": 0.25}),
    handoff.PerClass(rows=({"model": "probe", "label": "a", "precision": 1.0, "recall": 0.5,
                            "f1": 0.5, "support": 2},
                           {"model": "finetune", "label": "a", "precision": 0.5,
                            "recall": 0.5, "f1": 0.5, "support": 2})),
    handoff.Predictions(k=2, rows=(
        {"model": "probe", "relpath": "a/1.png", "sha256": "s1", "label": "a",
         "top": ("a", "b"), "scores": (0.75, 0.25), "kind": "probability", "loss": 0.25,
         "correct": True},
        {"model": "finetune", "relpath": "a/1.png", "sha256": "s1", "label": "a",
         "top": ("b",), "scores": (1.0,), "kind": "probability", "loss": 3.0,
         "correct": False})),
    handoff.Duplicates(
        threshold=0.9, layer="pooled",
        near_duplicates={"threshold": 0.9, "train_typical": 0.5, "count": 1, "pairs": (
            {"similarity": 0.95, "exact": False, "image": IMAGE, "train_image": TRAIN_IMAGE},)},
        label_conflicts={"count": 0, "groups": ()},
        identical_files={"count": 1, "files": 2, "groups": (
            {"sha256": "s1", "labels": ("a",), "splits": ("train", "val"),
             "crosses_splits": True, "images": (IMAGE, TRAIN_IMAGE)},)}),
    handoff.LabelIssues(method="m", layer="pooled", C=(1.0,), checked=4, folds=2,
                        oof_accuracy=0.75, count=1,
                        images=({**IMAGE, "suggested": "b", "p_label": 0.1,
                                 "p_suggested": 0.9},)),
    handoff.Balance(classes=("a", "b"), splits={"train": {"a": 2, "b": 1}},
                    imbalance={"train": 2.0}, missing={"train": []}),
    handoff.NewImages(new=3, novel=1, extractor_id="e1", layer="pooled", k=5, threshold=1.5,
                      images=({**IMAGE, "distance": 2.0},), max_listed=100),
    handoff.Coverage(rows=({"min_confidence": 0.5, "coverage": 0.75, "accuracy": 0.9,
                            "kept": 3},
                           {"min_confidence": 0.95, "coverage": 0.0, "accuracy": None,
                            "kept": 0})),
    handoff.FinetuneCurve(points=({"epoch": 1, "train_loss": 1.146754, "val_accuracy": 0.5},
                                  {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.666667})),
]


@pytest.mark.parametrize("model", EXAMPLES, ids=lambda m: type(m).__name__)
def test_each_model_reads_what_it_wrote(tmp_path: Path, model: handoff.Handoff):
    path = tmp_path / "file"
    model.write(path)
    assert type(model).read(path) == model
    first = path.read_bytes()
    model.write(path)  # the same model gives the same bytes
    assert path.read_bytes() == first


def test_every_handoff_model_has_an_example():
    models = {c for c in vars(handoff).values()
              if isinstance(c, type) and issubclass(c, handoff.Handoff)
              and c not in (handoff.Handoff, handoff.CsvHandoff)}  # the bases are no file
    assert models == {type(m) for m in EXAMPLES}


def test_the_files_keep_their_keys(tmp_path: Path):
    """Users' scripts and DVC read these files: their layout is the contract."""
    EXAMPLES[7].write(tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text()) == {
        "probe": {"accuracy": 1.0, "macro_f1": 0.5, "n": 2, "ece": 0.1, "ece_t": 0.05},
        "finetune": {"accuracy": 0.5, "macro_f1": 0.25}}
    EXAMPLES[1].write(tmp_path / "extract.json")
    assert json.loads((tmp_path / "extract.json").read_text())["skipped"] == 1
    EXAMPLES[5].write(tmp_path / "compare.json")
    assert json.loads((tmp_path / "compare.json").read_text()) == {"compared": False}
    EXAMPLES[8].write(tmp_path / "per_class.csv")
    assert (tmp_path / "per_class.csv").read_text().splitlines() == [
        "class,support,probe_precision,probe_recall,probe_f1,finetune_precision,"
        "finetune_recall,finetune_f1", "a,2,1,0.5,0.5,0.5,0.5,0.5"]


def test_from_scores(tmp_path: Path):
    per_class = {"a": {"precision": 1.0, "recall": 0.5, "f1-score": 2 / 3, "support": 2}}
    scores = {"probe": {"accuracy": 1.0, "macro_f1": 0.5, "n": 2, "per_class": per_class},
              "finetune": {"accuracy": 0.5, "macro_f1": 0.25, "n": 2, "per_class": per_class}}
    metrics = handoff.EvalMetrics.from_scores(scores)
    assert metrics.as_json() == {"probe": {"accuracy": 1.0, "macro_f1": 0.5, "n": 2},
                                 "finetune": {"accuracy": 0.5, "macro_f1": 0.25}}
    handoff.PerClass.from_scores(scores).write(tmp_path / "per_class.csv")
    rows = handoff.PerClass.read(tmp_path / "per_class.csv").rows
    assert [(r.model, r.label, r.f1, r.support) for r in rows] == [
        ("probe", "a", 0.666667, 2), ("finetune", "a", 0.666667, 2)]


def test_an_eval_file_of_short_names_still_reads(tmp_path: Path):
    flat = {"acc": 0.9, "f1": 0.8, "n": 3, "ft_acc": 0.95, "ft_f1": 0.9}
    m = handoff.EvalMetrics.parse(json.dumps(flat), tmp_path / "old.json")
    assert (m.probe.accuracy, m.probe.n, m.finetune.accuracy) == (0.9, 3, 0.95)


def test_pointer_helpers_and_the_sweep_plot(tmp_path: Path):
    features = tmp_path / "features"
    EXAMPLES[0].write_to(features)
    store = features / "e1.h5"
    assert handoff.current_store(features) == store
    assert handoff.read_candidates(features) == EXAMPLES[0].candidates
    store.touch()
    assert handoff.chosen_store(features, "e1", tmp_path / "h.json") == store
    with pytest.raises(TlflowError, match="names the codes of extractor e2, which"):
        handoff.chosen_store(features, "e2", tmp_path / "h.json")
    sweep = [handoff.SweepRow(layer="pooled", dim=8, C=10.0, val_accuracy=0.5),
             handoff.SweepRow(layer="pooled", dim=8, C=0.1, val_accuracy=0.25),
             handoff.SweepRow(layer="blocks.4", dim=4, C=0.1, val_accuracy=0.75)]
    handoff.write_sweep(tmp_path / "sweep.csv", sweep)  # a DVC plot: a column per layer
    assert (tmp_path / "sweep.csv").read_text().splitlines() == [
        "C,log10_C,pooled,blocks.4", "0.1,-1,0.25,0.75", "10,1,0.5,"]
    handoff.write_probe_metrics(tmp_path / "m.json", handoff.ProbeChoice(**CHOICE),
                                {"lite0": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "C": 1.0, "layer": "pooled", "acc": 0.5, "compare": {"lite0": 0.5}}


@pytest.mark.parametrize(("model", "name", "stage"), [
    (handoff.ExtractReport, "extract.json", "extract"),
    (handoff.ProbeReport, "probe.json", "train"),
    (handoff.Strategy, "strategy.json", "train"),
    (handoff.TrainChoice, "train_choice.json", "train"),
    (handoff.EvalMetrics, "eval.json", "evaluate"),
    (handoff.Duplicates, "duplicates.json", "audit"),
])
def test_missing_or_malformed_names_the_file_and_its_stage(tmp_path: Path, model, name,
                                                           stage):
    path = tmp_path / name
    with pytest.raises(TlflowError, match=rf"{name}: not found \(written by the {stage} stage"):
        model.read(path)
    path.write_text("{not json")
    with pytest.raises(TlflowError, match=rf"{name}: not valid JSON .*the {stage} stage"):
        model.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(TlflowError, match=rf"{name}: the file: .*the {stage} stage"):
        model.read(path)


def test_a_wrong_value_names_its_key(tmp_path: Path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"probe": {"accuracy": "high", "macro_f1": 0.5}}))
    with pytest.raises(TlflowError, match=r"eval.json: probe.accuracy: .*number.*evaluate"):
        handoff.EvalMetrics.read(path)
    path = tmp_path / "choice.json"
    path.write_text(json.dumps({"pooled_C": 1.0, "plan": None}))  # a key renamed or lost
    with pytest.raises(TlflowError, match=r"choice.json: backbone: field required \(and 3 "
                                          r"more\) \(written by the train stage"):
        handoff.TrainChoice.read(path)


def test_missing_pointer_names_extract(tmp_path: Path):
    with pytest.raises(TlflowError, match=r"current.json: not found \(written by the extract"):
        handoff.current_store(tmp_path)


def test_a_missing_or_malformed_csv_names_its_stage(tmp_path: Path):
    path = tmp_path / "per_class.csv"
    with pytest.raises(TlflowError, match=r"per_class.csv: not found \(written by the evaluate"):
        handoff.PerClass.read(path)
    path.write_text("class,support,probe_precision\na,x,1\n")
    with pytest.raises(TlflowError, match=r"per_class.csv: not a per-class table"):
        handoff.PerClass.read(path)
    path = tmp_path / "predictions.csv"
    path.write_text("model,relpath\nprobe,a.png\n")
    with pytest.raises(TlflowError, match=r"predictions.csv: not a predictions table"):
        handoff.Predictions.read(path)


def test_the_plots_keep_their_columns(tmp_path: Path):
    """DVC plots these CSVs by column name; evaluate and finetune wrote these bytes before
    the models read them."""
    EXAMPLES[-2].write(tmp_path / "coverage.csv")
    assert (tmp_path / "coverage.csv").read_text() == (
        "min_confidence,coverage,accuracy,kept\n0.5,0.75,0.9,3\n0.95,0,,0\n")
    EXAMPLES[-1].write(tmp_path / "finetune.csv")
    assert (tmp_path / "finetune.csv").read_text() == (
        "epoch,train_loss,val_accuracy\n1,1.146754,0.5\n2,0.5,0.666667\n")
    handoff.FinetuneCurve(points=()).write(tmp_path / "off.csv")  # fine-tuning off
    assert handoff.FinetuneCurve.read(tmp_path / "off.csv").points == ()


@pytest.mark.parametrize(("model", "name", "stage", "text", "problem"), [
    (handoff.Coverage, "coverage.csv", "evaluate", "min_confidence,coverage\n0.5,1\n",
     "not a coverage table"),
    (handoff.Coverage, "coverage.csv", "evaluate",
     "min_confidence,coverage,accuracy,kept\n0.5,most,,3\n", "not a coverage table"),
    (handoff.FinetuneCurve, "finetune.csv", "finetune", "epoch,train_loss\n1,0.5\n",
     "not a fine-tuning curve"),
    (handoff.FinetuneCurve, "finetune.csv", "finetune",
     "epoch,train_loss,val_accuracy\none,0.5,0.5\n", "not a fine-tuning curve"),
])
def test_a_missing_or_malformed_plot_names_its_stage(tmp_path: Path, model, name, stage, text,
                                                     problem):
    path = tmp_path / name
    with pytest.raises(TlflowError, match=rf"{name}: not found \(written by the {stage}"):
        model.read(path)
    path.write_text(text)
    with pytest.raises(TlflowError, match=rf"^{path}: {problem} .*\(written by the {stage} "
                                          "stage") as err:
        model.read(path)
    assert "\n" not in str(err.value)
