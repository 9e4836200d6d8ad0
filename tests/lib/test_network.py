"""The backbone as a network to fine-tune: what trains, BatchNorm policy, learning-rate groups."""


import json
from pathlib import Path

import pytest
import torch

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.finetune.network import (
    NetworkMeta,
    build,
    freeze,
    load_network,
    param_groups,
    read_meta,
    save_disabled,
    save_network,
    sidecar,
    train_mode,
)
from tlflow.tasks.lib.finetune.optim import make_optimizer
from tlflow.tasks.lib.probe.head import Calibration, meta_path

BACKBONE = "timm/tf_efficientnet_lite0"


def _net(trainable: str, n_blocks: int = 1, bn: str = "frozen"):
    cfg = Finetune(trainable=trainable, n_blocks=n_blocks, bn=bn)
    net = build(BACKBONE, "packaged", 32, 0, ("blue", "green", "red"))
    freeze(net, cfg)
    return net, cfg


def _step(net, cfg) -> dict[str, torch.Tensor]:
    """One optimizer step on a random batch; the state before it."""
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    opt = make_optimizer(net, cfg)
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


# a sidecar the fine-tune stage wrote before it recorded epochs_run, stopped_early and the
# calibration (tensors_sha256 made up: only the sidecar is read)
_OLD = {"backbone": BACKBONE, "best_epoch": 2, "classes": ["blue", "green", "red"],
        "data_config": {"crop_mode": "center", "crop_pct": 0.875, "input_size": [3, 32, 32],
                        "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
        "enabled": True, "format": "tlflow.finetuned/1", "image_size": 32,
        "init_head": "probe", "n_blocks": 1, "tensors_sha256": "0" * 64,
        "trainable": "last_n_blocks", "val_accuracy": 0.75}


def test_the_sidecar_round_trips_and_an_old_one_keeps_its_bytes(tmp_path: Path):
    """NetworkMeta reads what save_network and save_disabled write, typed (the calibration a
    record); no sidecar reads as not enabled; an older tlflow's sidecar reads with None for
    what it lacks and is written back byte for byte."""
    stem = tmp_path / "finetuned"
    assert read_meta(stem) == NetworkMeta(format="tlflow.finetuned/1", enabled=False)
    save_disabled(stem)
    assert read_meta(stem).as_json() == {"format": "tlflow.finetuned/1", "enabled": False}

    net = build(BACKBONE, "none", 32, 0, ("blue", "green", "red"))
    cal = Calibration(temperature=0.8, fit_on="val logits", nll=0.5, nll_calibrated=0.4)
    save_network(net, stem, sidecar(net, trainable="head", best_epoch=3, val_accuracy=0.9,
                                    epochs_run=4, stopped_early=False, calibration=cal))
    meta = read_meta(stem)
    assert (meta.enabled, meta.backbone, meta.classes) == (True, BACKBONE,
                                                           ("blue", "green", "red"))
    assert (meta.best_epoch, meta.val_accuracy, meta.calibration) == (3, 0.9, cal)
    assert meta.data_config["input_size"] == [3, 32, 32] and meta.tensors_sha256
    assert load_network(stem).meta == meta
    written = meta_path(stem).read_bytes()
    assert "folds" not in json.loads(written)["calibration"]  # only the keys it was given
    meta.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == written

    old = tmp_path / "old.json"
    old.write_text(json.dumps(_OLD, indent=2, sort_keys=True) + "\n")
    meta = NetworkMeta.read(old)
    assert (meta.epochs_run, meta.stopped_early, meta.calibration) == (None, None, None)
    meta.write(tmp_path / "old-again.json")
    assert (tmp_path / "old-again.json").read_bytes() == old.read_bytes()


@pytest.mark.parametrize(("obj", "problem"), [
    ("{not json", "not valid JSON"),
    ({"format": "tlflow.linear_head/1", "layer": "a"}, "not a tlflow.finetuned/1 sidecar"),
    ({"format": "tlflow.finetuned/1"}, "enabled: field required"),
    ({"format": "tlflow.finetuned/1", "enabled": True},
     "enabled, but backbone, classes or data_config is missing"),
    ({**_OLD, "best_epoch": "two"}, "best_epoch: input should be a valid integer"),
])
def test_a_malformed_sidecar_is_one_line_naming_it_and_finetune(tmp_path: Path, obj,
                                                                  problem: str):
    stem = tmp_path / "finetuned"
    meta_path(stem).write_text(obj if isinstance(obj, str) else json.dumps(obj))
    with pytest.raises(TlflowError, match=rf"^{meta_path(stem)}: .*{problem}.*\(written by "
                                          r"the finetune stage") as err:
        read_meta(stem)
    assert "\n" not in str(err.value)
