"""Fine-tuning: the real network (EfficientNet-Lite0, packaged weights) at 32 px, a few steps."""

import json
import os
import random
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

from tasks import evaluate, extract, finetune, ingest, predict, train
from tasks.lib import finetuning as tuning
from tasks.lib.errors import TlflowError
from tasks.lib.featurestore import FeatureStore
from tasks.lib.handoff import current_store
from tasks.lib.head import load_head
from tasks.lib.manifest import read_manifest
from tasks.lib.network import (
    build,
    freeze,
    init_from_probe,
    load_network,
    param_groups,
    read_meta,
    train_mode,
)
from tasks.lib.params import Finetune, parse_params
from tests.conftest import COLOURS, ROOT, cli_env, make_params, write_image

TINY = {"layers": ["pooled"], "image_size": 32}
BACKBONE = "timm/tf_efficientnet_lite0"


def _colour_folder(root: Path) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(12):
            write_image(root / name / f"{i:02d}.png", colour, seed=100 * c + i)
    return root


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


def _net(trainable: str, n_blocks: int = 1, bn: str = "frozen"):
    cfg = Finetune(trainable=trainable, n_blocks=n_blocks, bn=bn)
    net = build(BACKBONE, "packaged", 32, 0, ("blue", "green", "red"))
    freeze(net, cfg)
    return net, cfg


def _step(net, cfg) -> dict[str, torch.Tensor]:
    """One optimizer step on a random batch; the state before it."""
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    opt = tuning.make_optimizer(net, cfg)
    train_mode(net, cfg.bn)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(net.model(x), y).backward()
    opt.step()
    return before


@pytest.mark.parametrize(("trainable", "first"),
                         [("head", "classifier."), ("last_n_blocks", "blocks.6."), ("all", "")])
def test_only_the_intended_parameters_change(trainable, first):
    net, cfg = _net(trainable)
    before = _step(net, cfg)
    names = [n for n, _ in net.model.named_parameters()]
    start = next(i for i, n in enumerate(names) if n.startswith(first))
    after = dict(net.model.named_parameters())
    for i, name in enumerate(names):
        changed = not torch.equal(before[name], after[name].detach())
        if i < start:
            assert not changed, f"{name} is frozen but changed"
        elif after[name].grad is not None and after[name].grad.abs().sum() > 0:
            assert changed, f"{name} trains but did not change"
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"].detach())
    for name, buf in net.model.named_buffers():  # bn: frozen keeps every statistic
        assert torch.equal(before[name], buf), name


def test_bn_train_updates_statistics_only_where_the_network_trains():
    net, cfg = _net("last_n_blocks", bn="train")
    before = _step(net, cfg)
    stats = {n: b for n, b in net.model.named_buffers() if n.endswith("running_mean")}
    changed = {n for n, b in stats.items() if not torch.equal(before[n], b)}
    assert changed and all(n.startswith(("blocks.6.", "bn2.")) for n in changed)
    assert all(n in changed for n in stats if n.startswith("blocks.6."))


def test_learning_rates_and_weight_decay_per_group():
    net = build(BACKBONE, "packaged", 32, 0, ("a", "b"))
    cfg = Finetune(trainable="all", lr=1e-2, backbone_lr_ratio=0.1, layer_decay=0.5,
                   weight_decay=0.05)
    freeze(net, cfg)
    groups = param_groups(net, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(net.model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == pytest.approx(1e-2)
    assert lr_of[id(params["blocks.6.0.conv_pw.weight"])] == pytest.approx(1e-3)  # last block
    assert lr_of[id(params["blocks.4.0.conv_pw.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(params["conv_stem.weight"])] == pytest.approx(1e-3 * 0.5**5)
    assert wd_of[id(params["blocks.6.0.conv_pw.weight"])] == 0.05
    assert wd_of[id(params["blocks.6.0.bn1.weight"])] == 0.0
    assert wd_of[id(params["classifier.bias"])] == 0.0


def test_optimizer_and_schedule_from_timm_keep_each_groups_rate():
    """timm's create_optimizer_v2 on tlflow's groups, timm's CosineLRScheduler stepped per
    update: linear warm-up over round(0.5 epoch * 4) = 2 updates, cosine to 0 at update 8;
    every group follows the same curve at its own base rate; the state survives JSON."""
    import math

    net = build(BACKBONE, "packaged", 32, 0, ("a", "b"))
    cfg = Finetune(trainable="last_n_blocks", n_blocks=2, lr=1e-2, layer_decay=0.5,
                   epochs=2, warmup_epochs=0.5)
    freeze(net, cfg)
    opt = tuning.make_optimizer(net, cfg)
    assert type(opt) is torch.optim.AdamW
    base = [g["lr"] for g in opt.param_groups]
    assert base == [g["lr"] for g in param_groups(net, cfg)]
    sched = tuning.make_schedule(opt, 4, cfg)
    want = [0.0, 0.5] + [(1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)] + [0.0]
    for t, factor in enumerate(want):
        if t:
            sched.step_update(t)
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx([b * factor for b in base], abs=1e-15), t
    again = tuning.make_schedule(tuning.make_optimizer(net, cfg), 4, cfg)
    again.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    again.step_update(5)
    sched.step_update(5)
    assert [g["lr"] for g in again.optimizer.param_groups] == [
        g["lr"] for g in opt.param_groups]

    sgd = tuning.make_optimizer(net, cfg.model_copy(update={"optimizer": "sgd"}))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == cfg.momentum
    plain = tuning.make_optimizer(net, cfg.model_copy(update={"optimizer": "sgd",
                                                              "momentum": 0.0}))
    assert not plain.defaults["nesterov"] and plain.defaults["momentum"] == 0.0


def test_head_from_the_probe_gives_the_probes_logits_at_step_0(project):
    paths = project.base.paths
    head = load_head(paths.head)
    assert head.meta["layer"] == "pooled"
    net = build(BACKBONE, "packaged", 32, 0, head.classes)
    init_from_probe(net, head)
    rows = [r for r in read_manifest(paths.manifest) if r.split == "val"]
    with FeatureStore(current_store(paths.features)) as store:
        want = head.logits(store.read("pooled", [r.sha256 for r in rows]))
    ds = tuning.Images(rows, paths.images, head.classes, net.backbone.transform())
    got = tuning.logits(net, torch.utils.data.DataLoader(ds, batch_size=8),
                          torch.device("cpu"))
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.01)  # the store keeps float16
    assert (got.argmax(1) == want.argmax(1)).all()


def test_the_head_starts_from_a_probe_that_never_saw_val(project):
    """The saved probe is refit on train + val; the network's start must not be, or val
    would score near 1.0 from step 0 and could not choose an epoch."""
    from tasks.lib.probes import make_probe

    paths = project.base.paths
    rows = read_manifest(paths.manifest)
    with FeatureStore(current_store(paths.features)) as store:
        codes = {s: store.read("pooled", [r.sha256 for r in rows if r.split == s])
                 for s in ("train", "val")}
    labels = {s: [r.label for r in rows if r.split == s] for s in ("train", "val")}
    layers = json.loads(paths.probe_metrics.read_text())["layers"]
    C = next(r["C"] for r in layers if r["layer"] == "pooled")  # the sweep's choice on val
    start = tuning.probe_for_init(project, [r for r in rows if r.split == "train"], C)
    train_only = make_probe(C, project.train, 0).fit(codes["train"], labels["train"])
    both = make_probe(C, project.train, 0).fit(np.vstack([codes["train"], codes["val"]]),
                                               labels["train"] + labels["val"])
    x = codes["val"]
    np.testing.assert_allclose(start.logits(x), _logits(train_only, x), atol=1e-4)
    assert not np.allclose(start.logits(x), _logits(both, x), atol=1e-4)


def _logits(probe, x):
    from tasks.lib.probes import to_head

    return to_head(probe, {"layer": "pooled"}).logits(x)


def test_ties_in_val_accuracy_go_to_the_lower_val_loss():
    assert tuning.improves(0.9, 0.5, 0.8, 0.1)
    assert tuning.improves(0.9, 0.3, 0.9, 0.4)
    assert not tuning.improves(0.9, 0.4, 0.9, 0.4 + 1e-6)  # noise is not progress
    assert not tuning.improves(0.8, 0.1, 0.9, 0.4)


def test_early_stopping_stops(project):
    params = _with(project, enabled=True, epochs=10, patience=1, lr=1e-12, batch_size=16,
                   init_head="random")
    meta = finetune.run(params)
    assert meta["stopped_early"] and meta["epochs_run"] == 2 and meta["best_epoch"] == 1
    lines = params.base.paths.finetune_curve.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,val_accuracy" and len(lines) == 3
    assert not params.base.paths.finetune_checkpoints.exists()  # done: a rerun starts afresh


def test_finetuned_network_is_evaluated_and_predicts(project):
    params = _with(project, enabled=True, epochs=2, batch_size=8)
    finetune.run(params)
    assert read_meta(params.base.paths.finetuned)["enabled"] is True
    metrics = evaluate.run(params)
    assert set(metrics["finetune"]) >= {"accuracy", "macro_f1", "per_class"}
    assert metrics["finetune"]["n"] == metrics["probe"]["n"]
    net = load_network(params.base.paths.finetuned)
    assert net.classes == ("blue", "green", "red")
    preds = predict.run(params, Path(project.ingest.path) / "red", k=2, model="finetuned")
    assert len(preds) == 12 and all(sum(p.scores) <= 1.0 + 1e-6 for p in preds)


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

    def draw() -> None:
        while not stop.is_set():
            random.random()
            np.random.rand()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        finetune.run(params)
    finally:
        stop.set()
        thread.join()
    assert [p.read_bytes() for p in outputs] == first


def test_augmentation_draws_only_from_its_own_generator():
    aug = tuning.Augment(16, (0.3, 1.0), 0.5, "bilinear", (0.5,) * 3, (0.5,) * 3)
    from PIL import Image

    img = Image.new("RGB", (40, 30), (10, 200, 30))
    a = aug(img, random.Random("0:1:2"))
    random.seed(123)
    b = aug(img, random.Random("0:1:2"))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    boxes = {aug.crop_box(40, 30, random.Random(i)) for i in range(20)}
    assert len(boxes) > 10  # the crops do vary with the generator
    for top, left, h, w in boxes:
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w


def test_finetune_before_train_names_the_missing_file(tmp_path: Path):
    params = make_params(tmp_path, finetune={"enabled": True})
    with pytest.raises(TlflowError, match=r"train_choice.json: not found \(written by the "
                                          r"train stage"):
        finetune.run(params)


def test_disabled_stage_says_so(project):
    params = _with(project, enabled=False)
    assert finetune.run(params) is None
    assert read_meta(params.base.paths.finetuned) == {"format": "tlflow.finetuned/1",
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
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", stage], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path):
    from safetensors.torch import load_file

    images = _colour_folder(tmp_path / "src")
    env = {**cli_env(tmp_path), "PYTHONPATH": str(ROOT)}
    epochs = 5
    runs = {}
    for name in ("whole", "killed"):
        root = _write_project(tmp_path / name, images, epochs)
        for stage in ("ingest", "extract", "train"):
            assert _tlflow(root, stage, env).wait(120) == 0
        runs[name] = root
    assert _tlflow(runs["whole"], "finetune", env).wait(300) == 0

    root = runs["killed"]
    state = root / ".tlflow/finetune/state.json"
    proc = _tlflow(root, "finetune", env)
    deadline = time.monotonic() + 240
    while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["epoch"] < epochs  # killed mid-run
    assert not (root / "models/finetuned.safetensors").exists()
    resumed = _tlflow(root, "finetune", env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming after epoch" in out, out

    whole = load_file(runs["whole"] / "models/finetuned.safetensors")
    again = load_file(root / "models/finetuned.safetensors")
    assert whole.keys() == again.keys()
    for k in whole:
        assert torch.equal(whole[k], again[k]), k
    assert ((runs["whole"] / "plots/finetune.csv").read_text()
            == (root / "plots/finetune.csv").read_text())
