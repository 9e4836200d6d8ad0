"""The graphs export builds: each head kind against LinearHead's scores (torch), and the
fine-tuned network in ONNX Runtime against predict's torch path. timm's tiny test_efficientnet
with random weights: equivalence is checked here, accuracy on real photos in
tests/test_export.py."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import colour_images
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Train
from tlflow.tasks.lib.data.imagefiles import image_files
from tlflow.tasks.lib.features.backbones import create_backbone
from tlflow.tasks.lib.features.codes import CodeExtractor
from tlflow.tasks.lib.features.extraction import encode
from tlflow.tasks.lib.models.onnxexport import (
    ProbeGraph,
    SoftmaxGraph,
    export,
    ort_session,
    preprocess,
    read_batch,
    require_onnx,
    run_onnx,
)
from tlflow.tasks.lib.probe.head import HeadMeta, LinearHead
from tlflow.tasks.lib.probe.sweep import make_probe, to_head

NAME = "timm/test_efficientnet"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return image_files(colour_images(tmp_path_factory.mktemp("colours"), per_class=4))


def _backbone():
    return create_backbone(NAME, "none", 32, seed=0)


def _labels(files: list[Path]) -> np.ndarray:
    return np.array([f.parent.name for f in files])


@pytest.mark.parametrize(("train", "scores"), [
    ({"classifier": "logistic"}, "probability"),
    ({"classifier": "linear_svm", "normalize": "l2"}, "decision"),
    ({"classifier": "logistic", "normalize": "none"}, "ovr_probability"),
])
def test_the_probe_graph_scores_as_the_head_does(images: list[Path], train: dict, scores: str):
    backbone = _backbone()
    x = torch.from_numpy(read_batch(images, preprocess(backbone, "full")))
    codes = encode(CodeExtractor(backbone, ("pooled",)), x, torch.device("cpu"),
                   "fp32")["pooled"]
    head = to_head(make_probe(1.0, Train(**train), 0).fit(codes, _labels(images)),
                   HeadMeta(layer="pooled", extractor_id="e"))
    if scores == "ovr_probability":  # what an sgd log-loss head on 3 classes records
        head = LinearHead(head.weight, head.bias, head.mean, head.scale, head.classes,
                          head.meta.with_(scores=scores))
    assert head.meta.scores == scores
    want = head.predict_proba(codes) if head.has_probabilities else head.logits(codes)
    with torch.inference_mode():
        got = ProbeGraph(backbone, head).eval()(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_the_finetuned_graph_in_onnx_runtime_is_predicts(images: list[Path], tmp_path: Path):
    from tlflow.tasks.lib.data.decode import read_image
    from tlflow.tasks.lib.finetune.loop import finetuned_probabilities
    from tlflow.tasks.lib.finetune.network import new_network

    net = new_network(_backbone(), ("blue", "green", "red"))
    want = finetuned_probabilities(net, images, read_image, "cpu", batch_size=5)
    prep = preprocess(net.backbone, "full")
    done = export(SoftmaxGraph(net.model), 32, "probabilities", tmp_path / "finetuned.onnx",
                  {"classes": list(net.classes), "preprocess": prep})
    assert done.max_diff <= 1e-4 and done.size == done.onnx.stat().st_size
    got = run_onnx(ort_session(done.onnx), read_batch(images, prep))
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert done.sidecar == tmp_path / "finetuned.json"


def test_a_missing_package_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(TlflowError, match=r"package\(s\) onnx, onnxruntime, tlflow's "
                                          r"dependencies, missing here: pip "):
        require_onnx()
