"""Resumable training state: tensors in safetensors, everything else in JSON; no pickle.

`<dir>/state.json` is the commit point. It is written atomically after the epoch's tensors
(`epoch-NNNN.safetensors`: model and optimizer) and names them, so a run killed at any moment
finds either the previous epoch's state or this one's, never a mix. The optimizer's
param_groups (each group's current lr, timm's `initial_lr`, weight decay...) and the
scheduler's state_dict (timm.scheduler: its configuration and base values, JSON-able) go in
state.json; the optimizer's per-parameter tensors (AdamW's moments, SGD's momentum buffers)
in the epoch's safetensors file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tlflow.tasks.lib.files import atomic_path, write_json

if TYPE_CHECKING:  # torch is imported where tensors are handled: reading state.json needs none
    import torch
    from torch import nn

STATE = "state.json"
_OWN = re.compile(r"(epoch|best)-\d{4}\.safetensors")


class Schedule(Protocol):
    """What a checkpoint needs of an lr schedule (timm.scheduler's and torch's both fit)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors and JSON-able values."""
    import torch

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save(directory: Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
         sched: Schedule, meta: dict[str, Any]) -> None:
    """Commit the state after `epoch`: tensors first, then state.json; drop older tensors."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in state_tensors(model).items()}
    opt_tensors, opt_json = _optimizer_tensors(opt)
    name = f"epoch-{epoch:04d}.safetensors"
    with atomic_path(directory / name) as tmp:
        save_file({**tensors, **opt_tensors}, str(tmp))
    write_json(directory / STATE, {**meta, "epoch": epoch, "tensors": name,
                                   "optimizer": opt_json, "scheduler": sched.state_dict()})
    keep = {name, meta.get("best_file")}
    for old in own_tensors(directory):
        if old.name not in keep:
            old.unlink()


def own_tensors(directory: Path) -> list[Path]:
    """The tensor files a checkpoint folder holds that tlflow wrote (epoch-NNNN and
    best-NNNN .safetensors): clean-ups remove these, never whatever else is there."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and _OWN.fullmatch(p.name) is not None)


def clear(directory: Path) -> None:
    """Remove what tlflow wrote into a checkpoint folder (state.json, its tensors, and the
    same in sub-folders such as all/), then the folders it leaves empty; any other file stays,
    and so does its folder."""
    if not directory.is_dir():
        return
    for sub in (p for p in directory.iterdir() if p.is_dir() and not p.is_symlink()):
        clear(sub)
    for f in [*own_tensors(directory), directory / STATE]:
        f.unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()


def save_weights(path: Path, model: nn.Module) -> None:
    """The model's state dict alone (the best epoch's weights)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state_tensors(model), str(tmp))


def load_state(directory: Path) -> dict[str, Any] | None:
    """The committed state.json, or None when there is none (or it is unreadable)."""
    path = directory / STATE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if (directory / state["tensors"]).is_file() else None


def restore(directory: Path, state: dict[str, Any], model: nn.Module,
            opt: torch.optim.Optimizer, sched: Schedule, blob: bytes | None = None) -> None:
    """Load model, optimizer and scheduler as they were after state["epoch"]: from the
    tensor file state.json names, or from its bytes `blob` (read by rank 0 and sent to the
    other ranks of a distributed run)."""
    from safetensors.torch import load, load_file

    tensors = load(blob) if blob is not None else load_file(str(directory / state["tensors"]))
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


def load_weights(path: Path, model: nn.Module) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
