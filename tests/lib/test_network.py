"""The backbone as a network to fine-tune: what trains, BatchNorm policy, learning-rate groups."""


import pytest
import torch

from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.finetune.network import (
    build,
    freeze,
    param_groups,
    train_mode,
)
from tlflow.tasks.lib.finetune.optim import make_optimizer

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
