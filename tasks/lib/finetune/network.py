"""The backbone as a whole network for fine-tuning: a new head, frozen and trainable parts.

Blocks are the backbone's stages (timm's feature_info, torchvision's top-level children with
parameters). `last_n_blocks` trains the last N of them and everything after them (for
EfficientNet: conv_head, bn2 and the classifier); everything before stays frozen.

The network's sidecar <finetuned>.json is a hand-off file (finetune writes it; evaluate, the
run summary, predict, export and the history read it): one pydantic model, `NetworkMeta`,
written back with the keys it was given (tasks/lib/probe/head.py's ModelMeta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator
from torch import nn

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path
from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.features.backbones import Backbone, create_backbone
from tlflow.tasks.lib.probe.head import (
    LinearHead,
    ModelMeta,
    check_pair,
    meta_path,
    tensors_path,
    write_pair,
)

FORMAT = "tlflow.finetuned/1"


class NetworkMeta(ModelMeta):
    """<finetuned>.json: whether the fine-tune stage ran (`enabled`); when it did, what
    rebuilds the network (backbone, classes, timm's data config, the tensors' sha256), how it
    was trained and its calibration on val. Keys a sidecar from an older tlflow lacks default
    to None (not recorded then)."""

    STAGE: ClassVar[str] = "finetune"
    FORMAT: ClassVar[str | None] = FORMAT
    format: Literal["tlflow.finetuned/1"]
    enabled: bool  # False: the stage did not fine-tune (finetune.enabled off, no plan)
    backbone: str | None = None  # <source>/<model>, built with weights none, then loaded
    classes: tuple[str, ...] = ()  # in the classifier's output order
    # timm's data config: input_size [3, H, W] pixels, mean, std, interpolation, crop_pct...
    data_config: dict[str, Any] | None = None
    tensors_sha256: str | None = None  # the safetensors file it goes with
    trainable: str | None = None  # the phases, "+"-joined: head | last_n_blocks | all
    n_blocks: int | None = None  # finetune.n_blocks
    init_head: str | None = None  # finetune.init_head: probe | random
    image_size: int | None = None  # pixels, the input size it was trained at
    best_epoch: int | None = None  # the epoch kept (best on val), numbered along the curve
    val_accuracy: float | None = None  # of that epoch, in [0, 1]
    epochs_run: int | None = None  # epochs trained, every phase
    stopped_early: bool | None = None  # early stopping (finetune.patience) ended the kept phase

    @model_validator(mode="after")
    def _rebuildable(self) -> NetworkMeta:
        if self.enabled and (self.backbone is None or not self.classes
                             or self.data_config is None):
            raise ValueError("enabled, but backbone, classes or data_config is missing")
        return self


@dataclass
class Network:
    """A backbone whose classifier predicts `classes`."""

    backbone: Backbone
    classes: tuple[str, ...]
    # the sidecar it was loaded from (load_network): its calibration, epochs, ...; when built,
    # not yet fine-tuned (enabled False)
    meta: NetworkMeta = field(default_factory=lambda: NetworkMeta(format=FORMAT, enabled=False))

    @property
    def model(self) -> nn.Module:
        return self.backbone.model

    @property
    def head_name(self) -> str:
        return next(n for n, m in self.model.named_modules() if m is self.backbone.classifier)

    def blocks(self) -> tuple[str, ...]:
        """The stages one may unfreeze, first to last."""
        head = self.head_name
        return tuple(
            n for n in self.backbone.layer_names
            if n != head and not head.startswith(n + ".")
            and any(True for _ in self.model.get_submodule(n).parameters())
        )


def new_network(backbone: Backbone, classes: tuple[str, ...]) -> Network:
    """Replace the backbone's classifier by a freshly initialized one for `classes`."""
    net = Network(backbone, classes)
    parent, _, attr = net.head_name.rpartition(".")
    new = nn.Linear(backbone.classifier.in_features, len(classes))
    setattr(backbone.model.get_submodule(parent) if parent else backbone.model, attr, new)
    backbone.classifier = new
    return net


def init_from_probe(net: Network, head: LinearHead) -> None:
    """Fold the probe's standardization into the new classifier: same logits on the same codes.

    logits = ((x - mean) / scale) @ W.T + b = x @ (W / scale).T + (b - (W / scale) @ mean)
    """
    if head.meta.normalize == "l2":
        raise TlflowError("finetune.init_head: a probe with train.normalize: l2 is not linear in "
                          "the codes and cannot start the network's head; use init_head: random")
    if tuple(head.classes) != net.classes:
        raise TlflowError(f"finetune.init_head: the probe's classes {list(head.classes)} differ "
                          f"from the train split's {list(net.classes)}")
    w = head.weight / head.scale
    b = head.bias - w @ head.mean
    with torch.no_grad():
        net.backbone.classifier.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        net.backbone.classifier.bias.copy_(torch.as_tensor(b, dtype=torch.float32))


# ---------------------------------------------------------------- what trains


def _first_index(names: list[str], module: str) -> int:
    """Index of the first parameter name under `module`."""
    return next(i for i, n in enumerate(names) if n.startswith(module + "."))


def trainable_start(net: Network, cfg: Finetune) -> int:
    """Index, in named_parameters order, of the first parameter that trains."""
    names = [n for n, _ in net.model.named_parameters()]
    if cfg.trainable == "all":
        return 0
    if cfg.trainable == "head":
        first = net.head_name
    else:
        blocks = net.blocks()
        if cfg.n_blocks > len(blocks):
            raise TlflowError(
                f"finetune.n_blocks: {cfg.n_blocks}, but {net.backbone.name} has "
                f"{len(blocks)} blocks ({', '.join(blocks)})"
            )
        first = blocks[-cfg.n_blocks]
    return _first_index(names, first)


def freeze(net: Network, cfg: Finetune) -> None:
    """requires_grad on the parameters from the first trainable one on, off before it."""
    start = trainable_start(net, cfg)
    for i, (_, p) in enumerate(net.model.named_parameters()):
        p.requires_grad_(i >= start)


def train_mode(net: Network, bn: str) -> None:
    """train() for what learns; eval() for frozen modules (their BatchNorm statistics and
    dropout stay fixed: requires_grad=False alone does not stop running statistics from
    updating under train()) and, with bn: frozen, for every BatchNorm."""
    net.model.train()
    for m in net.model.modules():
        params = list(m.parameters(recurse=True))
        frozen = bool(params) and not any(p.requires_grad for p in params)
        if frozen or (bn == "frozen" and isinstance(m, nn.modules.batchnorm._BatchNorm)):
            m.eval()


def param_groups(net: Network, cfg: Finetune) -> list[dict[str, Any]]:
    """Optimizer groups: the head at lr, the body at lr * backbone_lr_ratio, times
    layer_decay ** k for a parameter k blocks (`blocks()`, the feature_info stages) before the
    last one (BEiT's layer-wise decay, Bao et al. 2021, counted in stages); what follows the
    last block (EfficientNet's conv_head, bn2) counts as the last block. No weight decay on
    1-d tensors (norm parameters, biases); frozen parameters are in no group. Groups are
    keyed by (lr, weight_decay), in parameter order.

    Written here, not taken from timm.optim.param_groups_layer_decay (which
    create_optimizer_v2(model, layer_decay=...) uses): timm has no separate head/body ratio,
    and its layers are the model's group_matcher groups (every sub-block of EfficientNet,
    the head at the top scale), so for tf_efficientnet_lite0, lr 1e-2, ratio 0.1, decay 0.5
    it gives conv_head 5e-3 (required 1e-3), blocks.4 3.9e-5 (5e-4), conv_stem 7.6e-8
    (3.1e-5). The optimizer itself is timm's (ftoptim.make_optimizer)."""
    head = net.head_name + "."
    blocks = net.blocks()
    names = [n for n, _ in net.model.named_parameters()]
    starts = [_first_index(names, b) for b in blocks]
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for i, (name, p) in enumerate(net.model.named_parameters()):
        if not p.requires_grad:
            continue
        lr = cfg.lr
        if not name.startswith(head):
            lr *= cfg.backbone_lr_ratio
            if cfg.layer_decay is not None:
                lr *= cfg.layer_decay ** (len(blocks) - sum(s <= i for s in starts))
        decay = cfg.weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


# ---------------------------------------------------------------- on disk


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_disabled(stem: Path) -> None:
    """The fine-tune stage's outputs when it does not run: an empty tensor file and a sidecar
    that says so (safetensors' metadata holds one key: more would be written in any order)."""
    from safetensors.numpy import save_file

    with atomic_path(tensors_path(stem)) as tmp:
        save_file({}, str(tmp), metadata={"format": FORMAT})
    NetworkMeta(format=FORMAT, enabled=False).write(meta_path(stem))


def read_meta(stem: Path) -> NetworkMeta:
    """The fine-tuned network's sidecar; enabled False (and nothing else) before the stage has
    run. A malformed one is a TlflowError naming it and the finetune stage."""
    path = meta_path(stem)
    if not path.is_file():
        return NetworkMeta(format=FORMAT, enabled=False)
    return NetworkMeta.read(path)


def sidecar(net: Network, **record: Any) -> NetworkMeta:
    """The fine-tuned network's sidecar: how it was trained (`record`: NetworkMeta's training
    keys, trainable ... calibration) and what rebuilds it (its backbone, classes, data config);
    save_network adds the tensors' sha256."""
    return NetworkMeta.model_validate({
        **record, "format": FORMAT, "enabled": True, "backbone": net.backbone.name,
        "classes": net.classes, "data_config": net.backbone.identity()["preprocess"]})


def save_network(net: Network, stem: Path, meta: NetworkMeta) -> None:
    """<stem>.safetensors (the state dict) and <stem>.json (`meta`, from `sidecar`)."""
    from safetensors.torch import save_file

    state = state_tensors(net.model)
    write_pair(stem, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}), meta)


def load_network(stem: Path) -> Network:
    """Rebuild the fine-tuned network from its sidecar and weights (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_meta(stem)
    if not meta.enabled:
        raise TlflowError(f"{meta_path(stem)}: no fine-tuned network (set finetune.enabled: true "
                          "and run `tlflow run`)")
    check_pair(stem, meta, "finetune")
    backbone = create_backbone(meta.backbone, "none")
    cfg = meta.data_config or {}
    backbone.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    net = new_network(backbone, meta.classes)
    net.meta = meta
    try:
        state = load_file(str(tensors_path(stem)))
    except (SafetensorError, OSError) as err:
        raise TlflowError(f"{tensors_path(stem)}: not a safetensors file: {err}") from None
    try:
        net.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TlflowError(f"{tensors_path(stem)}: does not fit {meta.backbone}: "
                          f"{err}") from None
    net.model.eval()
    return net


def build(backbone_name: str, weights: str, image_size: int | None, seed: int,
          classes: tuple[str, ...]) -> Network:
    """The pretrained backbone with a new head for `classes` (seeded initialization)."""
    backbone = create_backbone(backbone_name, weights, image_size, seed)
    torch.manual_seed(seed)
    return new_network(backbone, classes)
