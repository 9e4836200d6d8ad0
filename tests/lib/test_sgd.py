"""Out-of-core probes: codes streamed from a real HDF5 store, SGD fit by partial_fit."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from tlflow.tasks.lib.core.params import Train
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.probe import sgd
from tlflow.tasks.lib.probe.head import HeadMeta, load_head, save_head
from tlflow.tasks.lib.probe.sweep import make_probe, to_head

N_CLASSES, DIM = 3, 8


def _codes(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Keys, labels, an informative layer and a noise layer; rows sorted by class, as a
    store filled folder by folder is."""
    rng = np.random.default_rng(seed)
    y = np.sort(np.arange(n) % N_CLASSES)
    signal = rng.normal(size=(n, DIM)) + 3.0 * np.eye(N_CLASSES, DIM)[y] + 5.0
    keys = [f"{seed:04d}{i:060d}" for i in range(n)]
    return keys, y.astype(str), signal, rng.normal(size=(n, DIM))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A store of 600 train and 300 val rows, appended in batches of 100."""
    path = tmp_path_factory.mktemp("store") / "codes.h5"
    sets = []
    with FeatureStore.create(path, {"test": 1}, {"signal": DIM, "noise": DIM}, "float32") as s:
        for n, seed in ((600, 1), (300, 2)):
            keys, y, signal, noise = _codes(n, seed)
            for i in range(0, n, 100):
                s.append(keys[i:i + 100], {"signal": signal[i:i + 100],
                                           "noise": noise[i:i + 100]})
            sets.append(dict(zip(keys, y, strict=True)))
    return path, sets[0], sets[1]


def _in_memory(path: Path, labels: dict[str, str], layer: str):
    with FeatureStore(path) as s:
        return s.read(layer, labels), np.array(list(labels.values()))


def test_batches_hold_each_row_once_and_are_mixed(store):
    path, train, _ = store
    s = sgd.Stream(path, "signal", train, buffer_rows=256)
    batches = list(s.batches(seed=3))
    assert sum(len(y) for _, y in batches) == len(train) == 600
    assert all(len(set(y)) == N_CLASSES for _, y in batches)  # not one class per buffer
    x = np.concatenate([b[0] for b in batches])
    want, _ = _in_memory(path, train, "signal")
    np.testing.assert_allclose(np.sort(x, axis=0), np.sort(want, axis=0))


def test_streamed_standardization_equals_in_memory(store):
    path, train, _ = store
    scaler = sgd.fit_norm(sgd.Stream(path, "signal", train, buffer_rows=256),
                             "standardize")
    x, _ = _in_memory(path, train, "signal")
    ref = StandardScaler().fit(x)
    np.testing.assert_allclose(scaler.mean_, ref.mean_, rtol=1e-6)
    np.testing.assert_allclose(scaler.scale_, ref.scale_, rtol=1e-5)


@pytest.mark.parametrize("loss", ["log_loss", "hinge"])
def test_streaming_matches_in_memory(store, loss):
    """Small buffers (many partial_fit calls) and one buffer holding everything agree, and
    both reach the in-memory logistic probe's val accuracy within a tolerance."""
    path, train, val = store
    cfg = Train(classifier="sgd", loss=loss, epochs=5)
    va = sgd.Stream(path, "signal", val)
    small = sgd.accuracy(
        sgd.probe(sgd.Stream(path, "signal", train, 256), 1.0, cfg, 0), va)
    whole = sgd.accuracy(
        sgd.probe(sgd.Stream(path, "signal", train, 10**6), 1.0, cfg, 0), va)
    x, y = _in_memory(path, train, "signal")
    xv, yv = _in_memory(path, val, "signal")
    ref = make_probe(1.0, Train(), 0).fit(x, y).score(xv, yv)
    assert ref > 0.9
    assert abs(small - whole) <= 0.03 and abs(small - ref) <= 0.03, (small, whole, ref)


@pytest.mark.parametrize(("loss", "normalize"),
                         [("log_loss", "standardize"), ("hinge", "l2"), ("log_loss", "none")])
def test_sgd_head_exports_exactly(store, tmp_path: Path, loss, normalize):
    path, train, val = store
    cfg = Train(classifier="sgd", loss=loss, normalize=normalize, class_weight="balanced")
    probe = sgd.probe(sgd.Stream(path, "signal", train), 1.0, cfg, 0)
    save_head(to_head(probe, HeadMeta(layer="signal", extractor_id="e")), tmp_path / "h")
    head = load_head(tmp_path / "h")
    x, _ = _in_memory(path, val, "signal")
    np.testing.assert_array_equal(head.predict(x), probe.predict(x))
    if loss == "log_loss":
        assert head.meta.scores == "ovr_probability"
        np.testing.assert_allclose(head.predict_proba(x), probe.predict_proba(x), atol=1e-5)
    else:
        assert not head.has_probabilities
        np.testing.assert_allclose(head.logits(x), probe.decision_function(x), atol=1e-4)


def test_images_without_codes_are_an_error_not_a_skip(store):
    from tlflow.tasks.lib.core.errors import TlflowError

    path, train, _ = store
    ghost = {**train, "f" * 64: "0"}
    with pytest.raises(TlflowError, match=r"1 image\(s\) have no signal codes"):
        list(sgd.Stream(path, "signal", ghost).batches())
