"""The linear head on disk: safetensors + JSON sidecar, no pickle."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.lib.test_sweep import CFG, _blobs
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.probe.head import (
    Calibration,
    HeadMeta,
    HeadSidecar,
    LinearHead,
    Novelty,
    load_head,
    meta_path,
    parse_meta,
    save_head,
    tensors_path,
)
from tlflow.tasks.lib.probe.sweep import make_probe, to_head


@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_matches_sklearn_and_round_trips(tmp_path: Path, n_classes: int):
    x, y = _blobs(90, True, 0)
    keep = np.isin(y, [str(i) for i in range(n_classes)])
    x, y = x[keep], y[keep]
    probe = make_probe(1.0, CFG, 0).fit(x, y)
    head = to_head(probe, HeadMeta(layer="a", extractor_id="e1"))
    np.testing.assert_allclose(head.predict_proba(x), probe.predict_proba(x), atol=1e-6)
    save_head(head, tmp_path / "head")
    again = load_head(tmp_path / "head", extractor_id="e1")
    assert again.classes == head.classes and again.meta == head.meta
    np.testing.assert_allclose(again.predict_proba(x), head.predict_proba(x), atol=1e-5)


def _saved_head(tmp_path: Path) -> Path:
    x, y = _blobs(30, True, 0)
    clf = LogisticRegression().fit(x, y)
    head = LinearHead(clf.coef_, clf.intercept_, np.zeros(8), np.ones(8), tuple(clf.classes_),
                      HeadMeta(layer="a", extractor_id="e1"))
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


# what train wrote before it recorded the backbone, the calibration and the novelty check
_OLD = {"C": 1.0, "classes": ["a", "b"], "classifier": "logistic", "extractor_id": "e1",
        "format": "tlflow.linear_head/1", "layer": "pooled", "tensors_sha256": "0" * 64,
        "val_accuracy": 0.9}


def test_the_sidecar_round_trips_and_an_old_one_keeps_its_bytes(tmp_path: Path):
    """HeadSidecar reads what save_head writes into typed fields (the calibration and the
    novelty check as records); a sidecar from an older tlflow reads with defaults for what it
    lacks and is written back byte for byte (key-sorted JSON: DVC sees no change)."""
    import json

    stem = _saved_head(tmp_path)
    cal = Calibration(temperature=1.5, folds=5, fit_on="out-of-fold logits, train + val",
                      nll=0.3, nll_calibrated=0.2)
    nov = Novelty(k=1, threshold=0.8, rate=0.05, threshold_on="val", reference_rows=20,
                  train_rows=30)
    head = load_head(stem)
    save_head(LinearHead(head.weight, head.bias, head.mean, head.scale, head.classes,
                         head.meta.with_(calibration=cal, novelty=nov, C=0.5)), stem)
    got = HeadSidecar.read(meta_path(stem))
    assert (got.layer, got.extractor_id, got.C, got.classes) == ("a", "e1", 0.5, head.classes)
    assert got.calibration == cal and got.novelty == nov and got.scores == "probability"
    assert load_head(stem).meta == got.meta()
    written = meta_path(stem).read_bytes()
    HeadSidecar.read(meta_path(stem)).write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == written

    old = tmp_path / "old.json"
    old.write_text(json.dumps(_OLD, indent=2, sort_keys=True) + "\n")
    meta = HeadSidecar.read(old)
    assert (meta.backbone, meta.calibration, meta.novelty) == (None, None, None)
    assert (meta.normalize, meta.scores) == ("standardize", "probability")
    meta.write(tmp_path / "old-again.json")
    assert (tmp_path / "old-again.json").read_bytes() == old.read_bytes()


_OTHER = '{"format": "tlflow.finetuned/1", "enabled": false}'  # the network's, off


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "not valid JSON"),
    (_OTHER, "not a tlflow.linear_head/1 sidecar"),
    (_OTHER.replace("finetuned", "linear_head"), "layer: field required"),
    ('{"format": "tlflow.linear_head/1", "layer": "a", "extractor_id": "e", "classes": [],'
     ' "novelty": {"k": 1}}', "novelty.threshold: field required"),
])
def test_a_malformed_sidecar_is_one_line_naming_it_and_train(tmp_path: Path, text: str,
                                                               problem: str):
    path = tmp_path / "head.json"
    path.write_text(text)
    for read in (lambda: HeadSidecar.read(path), lambda: parse_meta(text, str(path))):
        with pytest.raises(TlflowError, match=rf"^{path}: {problem}.*\(written by the train "
                                              r"stage") as err:
            read()
        assert "\n" not in str(err.value)
