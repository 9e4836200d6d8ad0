"""Fine-tuning's optimizer and learning-rate schedule, both timm's.

The optimizer is timm.optim.create_optimizer_v2 (AdamW or Nesterov SGD) on tlflow's own
parameter groups (network.param_groups says why not timm's layer-decay groups); the rates
follow timm's CosineLRScheduler with a linear warm-up, stepped after every update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.finetune.network import Network, param_groups

if TYPE_CHECKING:
    from timm.scheduler import CosineLRScheduler


def make_optimizer(net: Network, cfg: Finetune) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2 on tlflow's own parameter groups (network.param_groups:
    head at lr, body at lr * backbone_lr_ratio times layer_decay per block; no weight decay on
    1-d tensors; frozen parameters in no group): AdamW, or SGD with Nesterov momentum (timm's
    'sgd'; 'momentum', i.e. plain SGD, when momentum is 0: Nesterov needs momentum > 0).

    timm's own grouping (create_optimizer_v2(model, layer_decay=...), i.e.
    param_groups_layer_decay over the model's group_matcher) is not used: it has no head/body
    ratio and counts every sub-block as a layer. Measured on tf_efficientnet_lite0 with
    lr 1e-2, backbone_lr_ratio 0.1, layer_decay 0.5: required / timm's lr for conv_head
    1e-3 / 5e-3, blocks.6 1e-3 / 5e-3, blocks.4 5e-4 / 3.9e-5, conv_stem 3.1e-5 / 7.6e-8
    (36 timm groups against 14)."""
    import timm.optim

    groups = param_groups(net, cfg)
    if cfg.optimizer == "sgd":
        name = "sgd" if cfg.momentum > 0 else "momentum"
        return timm.optim.create_optimizer_v2(groups, name, lr=cfg.lr, momentum=cfg.momentum)
    return timm.optim.create_optimizer_v2(groups, "adamw", lr=cfg.lr)


def make_schedule(opt: torch.optim.Optimizer, steps_per_epoch: int,
                  cfg: Finetune) -> CosineLRScheduler:
    """timm.scheduler.CosineLRScheduler over the run's updates (t_in_epochs=False, stepped by
    `step_update(updates done)` after each one): update t of the W = round(warmup_epochs *
    steps_per_epoch) warm-up updates runs at lr * t / W (from warmup_lr_init 0), then
    update t >= W at lr * (1 + cos(pi * (t - W) / (T - W))) / 2, reaching 0 at T =
    steps_per_epoch * epochs (SGDR's cosine, Loshchilov & Hutter 2017, without restarts).
    Each group keeps its own rate: its lr at construction is its base value."""
    from timm.scheduler import CosineLRScheduler

    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=0.0,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)


def optimizer_and_schedule(net: Network, cfg: Finetune, steps_per_epoch: int
                           ) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """A fresh optimizer and its warm-up + cosine schedule over the whole run."""
    opt = make_optimizer(net, cfg)
    return opt, make_schedule(opt, steps_per_epoch, cfg)
