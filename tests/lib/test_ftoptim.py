"""Fine-tuning's optimizer and schedule (timm's, on tlflow's parameter groups)."""

import json

import pytest
import torch

from tests.lib.test_network import BACKBONE
from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.finetune.network import (
    build,
    freeze,
    param_groups,
)
from tlflow.tasks.lib.finetune.optim import make_optimizer, make_schedule


def test_optimizer_and_schedule_from_timm_keep_each_groups_rate():
    """timm's create_optimizer_v2 on tlflow's groups, timm's CosineLRScheduler stepped per
    update: linear warm-up over round(0.5 epoch * 4) = 2 updates, cosine to 0 at update 8;
    every group follows the same curve at its own base rate; the state survives JSON."""
    import math

    net = build(BACKBONE, "packaged", 32, 0, ("a", "b"))
    cfg = Finetune(trainable="last_n_blocks", n_blocks=2, lr=1e-2, layer_decay=0.5,
                   epochs=2, warmup_epochs=0.5)
    freeze(net, cfg)
    opt = make_optimizer(net, cfg)
    assert type(opt) is torch.optim.AdamW
    base = [g["lr"] for g in opt.param_groups]
    assert base == [g["lr"] for g in param_groups(net, cfg)]
    sched = make_schedule(opt, 4, cfg)
    want = [0.0, 0.5] + [(1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)] + [0.0]
    for t, factor in enumerate(want):
        if t:
            sched.step_update(t)
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx([b * factor for b in base], abs=1e-15), t
    again = make_schedule(make_optimizer(net, cfg), 4, cfg)
    again.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    again.step_update(5)
    sched.step_update(5)
    assert [g["lr"] for g in again.optimizer.param_groups] == [
        g["lr"] for g in opt.param_groups]

    sgd = make_optimizer(net, cfg.model_copy(update={"optimizer": "sgd"}))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == cfg.momentum
    plain = make_optimizer(net, cfg.model_copy(update={"optimizer": "sgd",
                                                              "momentum": 0.0}))
    assert not plain.defaults["nesterov"] and plain.defaults["momentum"] == 0.0
