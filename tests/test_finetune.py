"""Fine-tuning: the real network (EfficientNet-Lite0, packaged weights) at 32 px, a few steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, cli_env, colour_images, make_params
from tlflow.tasks import evaluate, extract, finetune, ingest, predict, train
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.extract import current_store
from tlflow.tasks.lib.core.handoff.train import TrainChoice
from tlflow.tasks.lib.core.params import parse_params
from tlflow.tasks.lib.data.decode import read_image
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.features.runtime import code_precision
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.finetune.data import Images, class_indices
from tlflow.tasks.lib.finetune.loop import finetuned_probabilities, logits
from tlflow.tasks.lib.finetune.network import (
    build,
    init_from_probe,
    load_network,
    read_meta,
)
from tlflow.tasks.lib.probe.head import load_head

TINY = {"layers": ["pooled"], "image_size": 32}
BACKBONE = "timm/tf_efficientnet_lite0"


def _colour_folder(root: Path) -> Path:
    return colour_images(root)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Ingested, extracted and trained (a probe on pooled codes) once for the module."""
    tmp = tmp_path_factory.mktemp("ft")
    params = make_params(tmp, ingest={"source": "folder", "path": str(_colour_folder(tmp / "src"))},
                         extract=TINY)
    for stage in (ingest, extract, train):
        stage.run(params)
    return params


def _with(params, **finetune_values):
    raw = params.model_dump(mode="json")
    raw["finetune"].update(finetune_values)
    return parse_params(raw)


def test_head_from_the_probe_gives_the_probes_logits_at_step_0(project):
    paths = project.base.paths
    head = load_head(paths.head)
    assert head.meta.layer == "pooled"
    net = build(BACKBONE, "packaged", 32, 0, head.classes)
    init_from_probe(net, head)
    rows = [r for r in read_manifest(paths.manifest) if r.split == "val"]
    with FeatureStore(current_store(paths.features)) as store:
        want = head.logits(store.read("pooled", [r.sha256 for r in rows]))
    ds = Images([paths.images / r.relpath for r in rows],
                class_indices([r.label for r in rows], head.classes), read_image,
                net.backbone.transform())
    got = logits(net, torch.utils.data.DataLoader(ds, batch_size=8),
                 torch.device("cpu"),
                 code_precision(project.extract, torch.device("cpu")))  # the codes' own
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.01)  # the store keeps float16
    assert (got.argmax(1) == want.argmax(1)).all()


def test_the_head_starts_from_a_probe_that_never_saw_val(project):
    """The saved probe is refit on train + val; the network's start must not be, or val
    would score near 1.0 from step 0 and could not choose an epoch."""
    from tlflow.tasks.lib.probe.sweep import make_probe

    paths = project.base.paths
    rows = read_manifest(paths.manifest)
    with FeatureStore(current_store(paths.features)) as store:
        codes = {s: store.read("pooled", [r.sha256 for r in rows if r.split == s])
                 for s in ("train", "val")}
    labels = {s: [r.label for r in rows if r.split == s] for s in ("train", "val")}
    layers = json.loads(paths.probe_report.read_text())["layers"]
    C = next(r["C"] for r in layers if r["layer"] == "pooled")  # the sweep's choice on val
    choice = TrainChoice.read(paths.train_choice)
    assert choice.pooled_C == C
    start = finetune.probe_for_init(project, [r for r in rows if r.split == "train"], choice)
    train_only = make_probe(C, project.train, 0).fit(codes["train"], labels["train"])
    both = make_probe(C, project.train, 0).fit(np.vstack([codes["train"], codes["val"]]),
                                               labels["train"] + labels["val"])
    x = codes["val"]
    np.testing.assert_allclose(start.logits(x), _logits(train_only, x), atol=1e-4)
    assert not np.allclose(start.logits(x), _logits(both, x), atol=1e-4)


def _logits(probe, x):
    from tlflow.tasks.lib.probe.head import HeadMeta
    from tlflow.tasks.lib.probe.sweep import to_head

    return to_head(probe, HeadMeta(layer="pooled", extractor_id="e")).logits(x)


def test_early_stopping_stops(project):
    params = _with(project, enabled=True, epochs=10, patience=1, lr=1e-12, batch_size=16,
                   init_head="random")
    meta = finetune.run(params)
    assert meta.stopped_early and meta.epochs_run == 2 and meta.best_epoch == 1
    lines = params.base.paths.finetune_curve.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,val_accuracy" and len(lines) == 3
    assert not params.base.paths.finetune_checkpoints.exists()  # done: a rerun starts afresh


def test_finetuned_network_is_evaluated_and_predicts(project):
    params = _with(project, enabled=True, epochs=2, batch_size=8)
    finetune.run(params)
    assert read_meta(params.base.paths.finetuned).enabled is True
    metrics = evaluate.run(params)
    assert set(metrics["finetune"]) >= {"accuracy", "macro_f1", "per_class"}
    assert metrics["finetune"]["n"] == metrics["probe"]["n"]
    on_disk = json.loads(params.base.paths.eval_metrics.read_text())
    assert (on_disk["finetune"]["accuracy"], on_disk["finetune"]["macro_f1"]) == (
        metrics["finetune"]["accuracy"], metrics["finetune"]["macro_f1"])
    # its calibration: the ECE of its softmax, and after the val temperature its sidecar holds
    ft = on_disk["finetune"]
    assert 0 <= ft["ece"] <= 1 and 0 <= ft["ece_t"] <= 1 and "n" not in ft
    assert read_meta(params.base.paths.finetuned).calibration.temperature > 0
    header = params.base.paths.per_class.read_text().splitlines()[0].split(",")
    assert header[:2] == ["class", "support"] and "finetune_f1" in header
    net = load_network(params.base.paths.finetuned)
    assert net.classes == ("blue", "green", "red")
    files = sorted((Path(project.ingest.path) / "red").iterdir())
    preds = predict.run(params, Path(project.ingest.path) / "red", k=2, model="finetuned")
    proba = finetuned_probabilities(net, files, read_image)  # the network's own softmax
    assert [p.path for p in preds] == [str(f) for f in files]
    for p, row in zip(preds, proba, strict=True):
        top = np.argsort(-row)[:2]
        assert p.labels == tuple(net.classes[i] for i in top)
        np.testing.assert_allclose(p.scores, row[top], atol=1e-6)
    # temperature scaling on val (held out from training): recorded with the network, and
    # predict's confidence is softmax(logits / T), never the network's own probability
    cal = net.meta.calibration
    assert cal.fit_on == "val logits" and cal.nll_calibrated <= cal.nll + 1e-6
    from tlflow.tasks.lib.probe.calibration import softmax

    conf = softmax(np.log(proba), cal.temperature).max(axis=1)
    np.testing.assert_allclose([p.confidence for p in preds], conf, atol=1e-5)


def test_the_same_inputs_give_the_same_bytes_while_other_threads_draw(project):
    """Every random source of fine-tuning is its own (seeded from base.seed): a thread
    drawing from Python's and numpy's global generators meanwhile (as Prefect's client does)
    changes nothing, and two runs write identical files."""
    params = _with(project, enabled=True, epochs=2, batch_size=8, hflip=0.5)
    paths = params.base.paths
    outputs = (Path(f"{paths.finetuned}.safetensors"), Path(f"{paths.finetuned}.json"),
               paths.finetune_curve)
    finetune.run(params)
    first = [p.read_bytes() for p in outputs]
    stop = threading.Event()

    draws = [0]

    def draw() -> None:  # like Prefect's client: often, without holding the GIL throughout
        while not stop.wait(0.0005):
            random.random()
            np.random.rand()
            draws[0] += 1

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        finetune.run(params)
    finally:
        stop.set()
        thread.join()
    assert draws[0] > 100  # the thread did draw while the network trained
    assert [p.read_bytes() for p in outputs] == first


def test_finetune_before_train_names_the_missing_file(tmp_path: Path):
    params = make_params(tmp_path, finetune={"enabled": True})
    with pytest.raises(TlflowError, match=r"train_choice.json: not found \(written by the "
                                          r"train stage"):
        finetune.run(params)


def test_disabled_stage_says_so(project):
    params = _with(project, enabled=False)
    assert finetune.run(params) is None
    assert read_meta(params.base.paths.finetuned).as_json() == {"format": "tlflow.finetuned/1",
                                                                "enabled": False}
    assert "finetune" not in evaluate.run(params)
    with pytest.raises(TlflowError, match="no fine-tuned network"):
        predict.run(params, Path(project.ingest.path) / "red", model="finetuned")


def test_bad_params_name_the_key(project):
    raw = project.model_dump(mode="json")
    raw["finetune"]["backbone_lr_ratio"] = 0
    with pytest.raises(TlflowError, match=r"finetune\.backbone_lr_ratio"):
        parse_params(raw)
    with pytest.raises(TlflowError, match=r"finetune.n_blocks: 6, but .* has 5 blocks"):
        finetune.run(_with(project, enabled=True, n_blocks=6))


# ---------------------------------------------------------------- kill and resume


def _write_project(root: Path, images: Path, epochs: int) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(images))
    raw["extract"].update(TINY)
    raw["finetune"].update(enabled=True, epochs=epochs, batch_size=4, init_head="random",
                           patience=epochs, lr=3e-3)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _tlflow(root: Path, stage: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tlflow", "stage", stage], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.faults  # make faults (CI), not make test
def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path):
    from safetensors.torch import load_file

    images = _colour_folder(tmp_path / "src")
    env = {**cli_env(tmp_path), "PYTHONPATH": str(ROOT)}
    epochs = 3
    whole = _write_project(tmp_path / "whole", images, epochs)
    for stage in ("ingest", "extract", "train"):
        assert _tlflow(whole, stage, env).wait(120) == 0
    runs = {"whole": whole, "killed": Path(shutil.copytree(whole, tmp_path / "killed"))}
    assert _tlflow(runs["whole"], "finetune", env).wait(300) == 0

    root = runs["killed"]
    state = root / ".tlflow/finetune/state.json"
    proc = _tlflow(root, "finetune", env)
    deadline = time.monotonic() + 1200
    while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["epoch"] < epochs  # killed mid-run
    assert not (root / "models/finetuned.safetensors").exists()
    resumed = _tlflow(root, "finetune", env)
    out, _ = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0 and "resuming after epoch" in out, out

    whole = load_file(runs["whole"] / "models/finetuned.safetensors")
    again = load_file(root / "models/finetuned.safetensors")
    assert whole.keys() == again.keys()
    for k in whole:
        assert torch.equal(whole[k], again[k]), k
    assert ((runs["whole"] / "plots/finetune.csv").read_text()
            == (root / "plots/finetune.csv").read_text())
