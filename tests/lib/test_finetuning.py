"""The fine-tuning loop's parts: optimizer and schedule, epoch choice, augmentation."""

import json
import random

import pytest
import torch

from tests.lib.test_network import BACKBONE
from tlflow.tasks.lib import finetuning as tuning
from tlflow.tasks.lib.network import (
    build,
    freeze,
    param_groups,
)
from tlflow.tasks.lib.params import Finetune


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


def test_ties_in_val_accuracy_go_to_the_lower_val_loss():
    assert tuning.improves(0.9, 0.5, 0.8, 0.1)
    assert tuning.improves(0.9, 0.3, 0.9, 0.4)
    assert not tuning.improves(0.9, 0.4, 0.9, 0.4 + 1e-6)  # noise is not progress
    assert not tuning.improves(0.8, 0.1, 0.9, 0.4)


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
