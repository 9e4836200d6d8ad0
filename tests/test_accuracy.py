"""Accuracy claims on real images: the linear probe on hymenoptera (ants and bees)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import HYMENOPTERA, make_params
from tlflow.tasks import evaluate, extract, ingest, predict, train
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.features.runtime import effective_runtime

pytestmark = pytest.mark.accuracy  # `make accuracy` (CI runs it after `make test`)


@pytest.mark.slow
def test_probe_on_hymenoptera(tmp_path: Path, hymenoptera: Path):
    """Every default but the source: train/ gives train and val, val/ is the test set;
    image_size auto takes the model's own 224 px for photos; pooled codes win: >= 0.93."""
    params = make_params(tmp_path, ingest={"source": "folder", "path": str(hymenoptera)})
    assert params.extract.image_size == "auto"
    rows = ingest.run(params)
    assert sum(r.split == "test" for r in rows) == 153
    extract.run(params)
    report = json.loads(params.base.paths.extract_report.read_text())
    assert report["image_size"] == 224, report["image_size_why"]
    head = train.run(params)
    metrics = evaluate.run(params)
    assert head.meta.layer == "pooled"  # ants and bees are ImageNet-like: late codes win
    assert metrics["probe"]["accuracy"] >= 0.93, metrics["probe"]

    advice = json.loads(params.base.paths.strategy.read_text())
    assert (advice["size"], advice["similarity"], advice["plan"]) == ("small", "similar", "probe")
    assert advice["evidence"]["similarity"]["spread"]["top10_variance"] < 0.5

    _abstain_and_drift(tmp_path, params, metrics, hymenoptera)
    # torch's fp32 and bf16 codes (auto's are ONNX Runtime's fp32 on a CPU): within 0.005
    assert effective_runtime(params.extract, torch.device("cpu")) == "onnxruntime"
    for other in ("fp32", "bf16"):
        accuracy, _ = _probe_accuracy(tmp_path, other, source="folder", path=str(hymenoptera))
        assert abs(accuracy - metrics["probe"]["accuracy"]) <= 0.005, (other, accuracy, metrics)


def _abstain_and_drift(tmp_path: Path, params, metrics: dict, hymenoptera: Path) -> None:
    """--min-confidence 0.9 keeps images at least as accurate as all; the model's own test
    images are novel at most 5% of the time, 200 digits at least 90%."""
    with open(params.base.paths.coverage) as f:
        at = {r["min_confidence"]: r for r in csv.DictReader(f)}
    assert float(at["0.9"]["accuracy"]) >= metrics["probe"]["accuracy"], at
    assert metrics["probe"]["ece_t"] < 0.1, metrics["probe"]
    own = predict.run(params, params.base.paths.images / "val", model="probe",
                      min_confidence=0.9)  # the test split: hymenoptera's val/
    assert len(own) == 153 and np.mean([p.novel for p in own]) <= 0.05
    kept = [p for p in own if p.prediction != "unsure"]
    assert len(kept) < len(own)
    assert np.mean([Path(p.path).parent.name == p.labels[0] for p in kept]) \
        >= metrics["probe"]["accuracy"]
    digits = predict.run(params, _digit_images(tmp_path / "digits", 200), model="probe")
    assert np.mean([p.novel for p in digits]) >= 0.9


def _digit_images(dest: Path, n: int) -> Path:
    """The first n of scikit-learn's 8x8 digits as PNG files (grey levels 0-16 to 0-255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    dest.mkdir(parents=True)
    for i, img in enumerate(load_digits().images[:n]):
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(dest / f"{i:04d}.png")
    return dest


def _probe_accuracy(tmp_path: Path, precision: str, **ingest_cfg) -> float:
    """Test accuracy of the probe on codes computed in `precision`; each precision has its
    own store in the project's features folder."""
    params = make_params(tmp_path, ingest=ingest_cfg, extract={"precision": precision})
    if not params.base.paths.manifest.is_file():
        ingest.run(params)
    store = extract.run(params)
    train.run(params)
    return evaluate.run(params)["probe"]["accuracy"], store



@pytest.mark.slow
def test_bf16_codes_train_as_accurate_a_probe_as_fp32_on_digits(tmp_path: Path):
    """The probe on bf16 codes, and on ONNX Runtime's fp32 codes (extract.runtime auto on a
    CPU), must score within 0.005 of the probe on torch's fp32 codes (the same test images).
    The same check on hymenoptera closes test_probe_on_hymenoptera."""
    fp32, fp32_store = _probe_accuracy(tmp_path, "fp32", source="digits")
    ort, ort_store = _probe_accuracy(tmp_path, "auto", source="digits")  # ONNX Runtime, fp32
    bf16, bf16_store = _probe_accuracy(tmp_path, "bf16", source="digits")
    assert len({fp32_store, ort_store, bf16_store}) == 3  # precision and runtime: in the id
    assert abs(bf16 - fp32) <= 0.005, (bf16, fp32)
    assert abs(ort - fp32) <= 0.005, (ort, fp32)

    # drift, from the digits' side: the photos are novel, the digits' own test images are not
    params = make_params(tmp_path, ingest={"source": "digits"}, extract={"precision": "bf16"})
    own = tmp_path / "own"  # the test split's files (their codes are in the store)
    own.mkdir()
    for r in read_manifest(params.base.paths.manifest):
        if r.split == "test":
            shutil.copy(params.base.paths.images / r.relpath, own / r.relpath.replace("/", "_"))
    assert np.mean([p.novel for p in predict.run(params, own, model="probe")]) <= 0.05
    if HYMENOPTERA.is_dir():
        photos = predict.run(params, HYMENOPTERA / "val", model="probe")
        assert np.mean([p.novel for p in photos]) >= 0.9
