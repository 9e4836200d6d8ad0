"""The linear head on disk: safetensors + JSON sidecar, no pickle."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.lib.test_sweep import CFG, _blobs
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.probe.head import LinearHead, load_head, save_head, tensors_path
from tlflow.tasks.lib.probe.sweep import make_probe, to_head


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


def test_tensors_without_their_sidecar_are_refused(tmp_path: Path):
    """A train killed between the two files leaves new tensors beside the old sidecar: the
    sidecar's sha256 of the tensors tells, and rerunning the stage repairs it."""
    stem = _saved_head(tmp_path)
    first = load_head(stem)
    x, _ = _blobs(4, True, 1)
    head = LinearHead(first.weight * 2, first.bias, first.mean, first.scale, first.classes,
                      first.meta)
    save_head(head, tmp_path / "new")
    tensors_path(stem).write_bytes(tensors_path(tmp_path / "new").read_bytes())
    with pytest.raises(TlflowError, match=r"head.safetensors does not match its sidecar .*"
                                          r"rerun `tlflow stage train`"):
        load_head(stem)
    save_head(head, stem)  # the stage rerun
    np.testing.assert_allclose(load_head(stem).logits(x), head.logits(x), atol=1e-5)
