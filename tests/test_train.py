import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tasks import extract, ingest, train
from tasks.lib.errors import TlflowError
from tasks.lib.head import LinearHead, load_head, save_head, tensors_path
from tasks.lib.params import Train
from tasks.lib.probes import Split, best, make_probe, sweep, to_head
from tests.conftest import make_params

CFG = Train(C_grid=(0.01, 1.0, 100.0))


def _blobs(n: int, informative: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 8))
    if informative:
        x[:, :3] += 4.0 * np.eye(3)[y]
    return x, y.astype(str)


def _split(informative: bool) -> Split:
    xt, yt = _blobs(90, informative, 0)
    xv, yv = _blobs(60, informative, 1)
    return Split(xt, yt, xv, yv)


def test_layer_sweep_picks_the_informative_layer():
    table = sweep({"noise": _split(False), "signal": _split(True)}, CFG, seed=0)
    assert len(table) == 6
    top = best(table)
    assert top["layer"] == "signal" and top["val_accuracy"] > 0.9


def _imbalanced(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable but imbalanced (80/20): a tiny C shrinks the weights to nothing and the
    unpenalized intercept predicts the majority class; a large C separates."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    x = rng.normal(size=(n, 5))
    x[:, 0] += 3.0 * (2 * y - 1)
    return x, y.astype(str)


def test_C_selection_picks_the_right_end_of_the_grid():
    split = Split(*_imbalanced(200, 0), *_imbalanced(200, 1))
    table = sweep({"x": split}, Train(C_grid=(1e-4, 1e-2, 10.0)), 0)
    assert [r["C"] for r in table] == [1e-4, 1e-2, 10.0]
    assert table[0]["val_accuracy"] < 0.85  # the majority class, about 0.8
    assert best(table)["C"] == 10.0 and best(table)["val_accuracy"] > 0.97


@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_matches_sklearn_and_round_trips(tmp_path: Path, n_classes: int):
    x, y = _blobs(90, True, 0)
    keep = np.isin(y, [str(i) for i in range(n_classes)])
    x, y = x[keep], y[keep]
    probe = make_probe(1.0, CFG, 0).fit(x, y)
    head = to_head(probe, {"layer": "a", "extractor_id": "e1"})
    np.testing.assert_allclose(head.predict_proba(x), probe.predict_proba(x), atol=1e-6)
    save_head(head, tmp_path / "head")
    again = load_head(tmp_path / "head", extractor_id="e1")
    assert again.classes == head.classes and again.meta == head.meta
    np.testing.assert_allclose(again.predict_proba(x), head.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("classifier", ["logistic", "linear_svm"])
@pytest.mark.parametrize("normalize", ["standardize", "l2", "none"])
def test_every_classifier_and_normalization_exports_exactly(tmp_path, classifier, normalize):
    x, y = _blobs(120, True, 0)
    x += 2.0  # away from the origin, so l2 normalization matters
    cfg = Train(classifier=classifier, normalize=normalize, class_weight="balanced")
    probe = make_probe(1.0, cfg, 0).fit(x, y)
    assert probe.score(x, y) > 0.9  # separable
    head = to_head(probe, {"layer": "a", "extractor_id": "e1"})
    save_head(head, tmp_path / "head")
    head = load_head(tmp_path / "head")
    np.testing.assert_array_equal(head.predict(x), probe.predict(x))
    if classifier == "logistic":
        np.testing.assert_allclose(head.predict_proba(x), probe.predict_proba(x), atol=1e-5)
    else:
        assert not head.has_probabilities
        np.testing.assert_allclose(head.logits(x), probe.decision_function(x), atol=1e-4)


def test_cv_chooses_C_when_there_is_no_val_split():
    x, y = _imbalanced(200, 0)
    empty = np.empty((0, x.shape[1]))
    table = sweep({"a": Split(x, y, empty, np.array([], dtype=str))},
                  Train(C_grid=(1e-4, 10.0), cv=3), seed=0)
    assert best(table)["C"] == 10.0 and best(table)["val_accuracy"] > 0.97


def _saved_head(tmp_path: Path) -> Path:
    x, y = _blobs(30, True, 0)
    clf = LogisticRegression().fit(x, y)
    head = LinearHead(clf.coef_, clf.intercept_, np.zeros(8), np.ones(8), tuple(clf.classes_),
                      {"layer": "a", "extractor_id": "e1"})
    save_head(head, tmp_path / "head")
    return tmp_path / "head"


def test_refuses_pickle_truncated_and_foreign_heads(tmp_path: Path):
    import pickle

    stem = _saved_head(tmp_path)
    with pytest.raises(TlflowError, match="trained on codes of extractor e1, not e2"):
        load_head(stem, extractor_id="e2")
    data = tensors_path(stem).read_bytes()
    tensors_path(stem).write_bytes(data[: len(data) // 2])
    with pytest.raises(TlflowError, match="not a safetensors head"):
        load_head(stem)
    tensors_path(stem).write_bytes(pickle.dumps({"weight": [1.0]}))
    with pytest.raises(TlflowError, match="pickles are refused"):
        load_head(stem)
    with pytest.raises(TlflowError, match="not found"):
        load_head(tmp_path / "absent")


@pytest.mark.parametrize("classifier", ["logistic", "sgd"])
def test_train_stage_on_tiny_images(tmp_path: Path, image_folder: Path, classifier: str):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder)},
        extract={"layers": ["pooled", "blocks.2"], "image_size": 32},
        train={"classifier": classifier},
    )
    ingest.run(params)
    extract.run(params)
    head = train.run(params)
    probe = json.loads(params.base.paths.probe_metrics.read_text())
    assert len(probe["sweep"]) == 2 * len(params.train.C_grid)
    assert sorted(r["layer"] for r in probe["layers"]) == ["blocks.2", "pooled"]
    assert probe["best"]["layer"] == head.meta["layer"]
    assert head.meta["classifier"] == classifier
    assert head.classes == ("blue", "green", "red")
    assert probe["best"]["val_accuracy"] >= 0.8  # colour is easy


def test_train_uses_cv_without_a_val_split(tmp_path: Path, image_folder: Path):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder), "val_fraction": 0.0},
        extract={"layers": ["pooled"], "image_size": 32}, train={"cv": 3},
    )
    for stage in (ingest, extract):
        stage.run(params)
    assert train.run(params).meta["val_accuracy"] >= 0.8


def test_train_needs_a_val_split(tmp_path: Path, image_folder: Path):
    params = make_params(
        tmp_path, ingest={"source": "folder", "path": str(image_folder), "val_fraction": 0.0},
        extract={"layers": ["pooled"], "image_size": 32},
    )
    ingest.run(params)
    extract.run(params)
    with pytest.raises(TlflowError, match="val split is empty"):
        train.run(params)


def test_train_writes_the_head_it_fitted_whatever_was_there(tmp_path: Path,
                                                             image_folder: Path):
    """A function of its inputs: a worse grid gives a worse head (no promotion inside train),
    and the first grid again gives the first head's bytes again."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    for stage in (ingest, extract, train):
        stage.run(params)
    first = tensors_path(params.base.paths.head).read_bytes()
    sidecar = params.base.paths.head.with_suffix(".json").read_bytes()
    raw = params.model_dump(mode="json")
    raw["train"]["C_grid"] = [1e-7]  # weights shrink to nothing: the majority class
    head = train.run(type(params).model_validate(raw))
    assert head.meta["C"] == 1e-7
    assert tensors_path(params.base.paths.head).read_bytes() != first
    train.run(params)
    assert tensors_path(params.base.paths.head).read_bytes() == first
    assert params.base.paths.head.with_suffix(".json").read_bytes() == sidecar


def test_a_damaged_head_is_repaired_by_rerunning_train(tmp_path: Path, image_folder: Path):
    """Train never reads the head it wrote before, so a truncated one is simply replaced."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(image_folder)},
                         extract={"layers": ["pooled"], "image_size": 32})
    for stage in (ingest, extract, train):
        stage.run(params)
    path = tensors_path(params.base.paths.head)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TlflowError, match="not a safetensors head"):
        load_head(params.base.paths.head)
    train.run(params)
    assert path.read_bytes() == good
    assert load_head(params.base.paths.head).classes == ("blue", "green", "red")
