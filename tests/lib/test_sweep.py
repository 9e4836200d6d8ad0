"""Linear probes: the (layer, C) sweep on val or by CV, and the export to a LinearHead."""


import numpy as np
import pytest

from tlflow.tasks.lib.core.params import Train
from tlflow.tasks.lib.probe.head import HeadMeta, load_head, save_head
from tlflow.tasks.lib.probe.sweep import Split, best, make_probe, sweep, to_head

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
    assert top.layer == "signal" and top.val_accuracy > 0.9


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
    assert [r.C for r in table] == [1e-4, 1e-2, 10.0]
    assert table[0].val_accuracy < 0.85  # the majority class, about 0.8
    assert best(table).C == 10.0 and best(table).val_accuracy > 0.97


@pytest.mark.parametrize("classifier", ["logistic", "linear_svm"])
@pytest.mark.parametrize("normalize", ["standardize", "l2", "none"])
def test_every_classifier_and_normalization_exports_exactly(tmp_path, classifier, normalize):
    x, y = _blobs(120, True, 0)
    x += 2.0  # away from the origin, so l2 normalization matters
    cfg = Train(classifier=classifier, normalize=normalize, class_weight="balanced")
    probe = make_probe(1.0, cfg, 0).fit(x, y)
    assert probe.score(x, y) > 0.9  # separable
    head = to_head(probe, HeadMeta(layer="a", extractor_id="e1"))
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
    assert best(table).C == 10.0 and best(table).val_accuracy > 0.97
