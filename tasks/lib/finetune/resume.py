"""Fine-tuning's resume: what a checkpoint holds, whose it is, and whether to continue from it.

A checkpoint is the state after an epoch: the model's and the optimizer's tensors (one
safetensors blob) and a JSON-able state (the phase's progress, the optimizer's param_groups,
timm's scheduler state_dict, the run's fingerprint). `pack` and `restore` turn the live
objects into those and back; where they are kept is the stage shell's business, through a
`Checkpoints` it hands the loop (tasks/finetune.py's CheckpointsFolder: the files of
tasks/lib/core/checkpoint.py). This module opens no file.

A run resumes a checkpoint only when its fingerprint (params, data, backbone, head start,
code) is this run's; a damaged one is never fatal: the run starts afresh. Under torchrun rank
0 reads the checkpoint and sends it to the others, so every rank decides alike.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from tlflow.tasks.lib.core.params import Finetune, Params
from tlflow.tasks.lib.finetune.network import Network, state_tensors
from tlflow.tasks.lib.finetune.optim import optimizer_and_schedule
from tlflow.tasks.lib.scale import ddp

if TYPE_CHECKING:
    from timm.scheduler import CosineLRScheduler

# A phase's progress, as a checkpoint keeps it (besides the epoch and the tensors).
FRESH = {"curve": [], "best_accuracy": -1.0, "best_loss": math.inf, "best_epoch": 0,
         "best_file": None, "stopped_early": False}


class Schedule(Protocol):
    """What a checkpoint needs of an lr schedule (timm.scheduler's and torch's both fit)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Checkpoints(Protocol):
    """Where one phase's checkpoints are kept, as the stage shell provides it (rank 0 only
    calls it). `where` names it in messages; `state` is the committed state (None: none, or
    unreadable), `read(name)` the bytes of a tensor blob the state or a best epoch names."""

    where: str

    def state(self) -> dict[str, Any] | None: ...

    def read(self, name: str) -> bytes: ...

    def start_afresh(self) -> None: ...

    def commit(self, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
               sched: Schedule, meta: dict[str, Any]) -> None: ...

    def save_best(self, name: str, model: nn.Module) -> None: ...


# ---------------------------------------------------------------- what a checkpoint holds


def pack(epoch: int, model: nn.Module, opt: torch.optim.Optimizer, sched: Schedule,
         meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) after `epoch`: the model's tensors as `model.<key>`, the optimizer's
    per-parameter tensors (AdamW's moments, SGD's momentum buffers) as `optim.<idx>.<key>`;
    the state is `meta` with the epoch, the optimizer's param_groups and non-tensor values,
    and the scheduler's state_dict (all JSON-able)."""
    tensors = {f"model.{k}": v for k, v in state_tensors(model).items()}
    sd = opt.state_dict()
    scalars = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {**meta, "epoch": epoch,
                     "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
                     "scheduler": sched.state_dict()}


def restore(state: dict[str, Any], blob: bytes, model: nn.Module,
            opt: torch.optim.Optimizer, sched: Schedule) -> None:
    """Load model, optimizer and scheduler as they were after state["epoch"], from the
    state and the safetensors bytes `pack`'s tensors were saved as."""
    from safetensors.torch import load

    tensors = load(blob)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                          strict=True)
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    for k, v in state["optimizer"]["scalars"].items():
        idx, key = k.split(".", 1)
        opt_state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    sched.load_state_dict(state["scheduler"])


def fingerprint(params: Params, cfg: Finetune, manifest_sha256: str, skipped: list[str],
                backbone: str, weights: str, pooled_C: float | None, image_size: int,
                code: str) -> str:
    """What a checkpoint must share with this run to be resumed by it: params, data (the
    manifest's sha256, the images extract skipped), the backbone and the head's start, and
    the fine-tune stage's code (codedeps.code_hash)."""
    blob = json.dumps({  # where the machines meet changes nothing of the result
        "finetune": cfg.model_dump(mode="json", exclude={"rdzv_endpoint"}),
        "seed": params.base.seed,
        "backbone": backbone, "weights": weights, "image_size": image_size,
        "manifest": manifest_sha256, "skipped": skipped, "pooled_C": pooled_C,
        "max_iter": params.train.max_iter, "class_weight": params.train.class_weight,
        "code": code,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- deciding to resume


def _committed(checkpoints: Checkpoints, fingerprint: str) -> tuple[dict, bytes] | None:
    """The checkpoint this run may resume (its state and tensor bytes), as rank 0 reads it,
    on every rank; None when there is none or it belongs to other inputs."""
    found = None
    if ddp.current().main:
        state = checkpoints.state()
        if state is not None and state.get("fingerprint") == fingerprint:
            found = (state, checkpoints.read(state["tensors"]))
    state = ddp.broadcast_json(found[0] if found else None)
    if state is None:
        return None
    return state, ddp.broadcast_bytes(found[1] if found else None)


def resume(net: Network, cfg: Finetune, checkpoints: Checkpoints, fingerprint: str,
           steps: int) -> tuple[dict, torch.optim.Optimizer, CosineLRScheduler]:
    """The phase's state, optimizer and schedule: a matching checkpoint's, loaded into them
    and the network, or a fresh start (FRESH at epoch 0, the checkpoints started afresh).
    Every rank decides alike: same bytes."""
    opt, sched = optimizer_and_schedule(net, cfg, steps)
    found = _committed(checkpoints, fingerprint)
    if found is not None:
        state, blob = found
        initial = {k: v.clone() for k, v in net.model.state_dict().items()}
        try:
            restore(state, blob, net.model, opt, sched)
        except Exception as err:  # a damaged or foreign checkpoint: never fatal, start afresh
            ddp.say(f"finetune: {checkpoints.where} unusable "
                            f"({type(err).__name__}: {err}); starting afresh")
            net.model.load_state_dict(initial)
            opt, sched = optimizer_and_schedule(net, cfg, steps)
        else:
            ddp.say(f"finetune: resuming after epoch {state['epoch']} from "
                            f"{checkpoints.where}")
            return state, opt, sched
    if ddp.current().main:
        checkpoints.start_afresh()
    return {"epoch": 0, **FRESH, "curve": []}, opt, sched


def load_best(net: Network, checkpoints: Checkpoints, name: str) -> None:
    """The best epoch's weights (the blob `name`) into the network: read by rank 0, sent to
    the others."""
    if ddp.current().main:
        from safetensors.torch import load

        net.model.load_state_dict(load(checkpoints.read(name)), strict=True)
    ddp.broadcast_state(net.model)
