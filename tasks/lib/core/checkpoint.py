"""Resumable training state on disk: tensors in safetensors, everything else in JSON; no pickle.

`<dir>/state.json` is the commit point. It is written atomically after the epoch's tensors
(`epoch-NNNN.safetensors`: model and optimizer) and names them, so a run killed at any moment
finds either the previous epoch's state or this one's, never a mix. What the two hold (the
model's and the optimizer's tensors; the optimizer's param_groups, timm's scheduler
state_dict and the phase's progress in JSON) is tasks/lib/finetune/resume.py's `pack`; this module
writes, reads and clears the files, for the fine-tune stage's shell.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlflow.tasks.lib.core.files import atomic_path, write_json

if TYPE_CHECKING:  # torch is imported where tensors are handled: reading state.json needs none
    import torch

STATE = "state.json"
_OWN = re.compile(r"(epoch|best)-\d{4}\.safetensors")


def save(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Commit the state after state["epoch"] (ftresume.pack's tensors and state): tensors
    first, as epoch-NNNN.safetensors, then state.json naming them; drop older tensors but
    the best epoch's (state["best_file"])."""
    from safetensors.torch import save_file

    name = f"epoch-{state['epoch']:04d}.safetensors"
    with atomic_path(directory / name) as tmp:
        save_file(tensors, str(tmp))
    write_json(directory / STATE, {**state, "tensors": name})
    keep = {name, state.get("best_file")}
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


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Weights alone (e.g. the best epoch's state dict), atomically, as safetensors."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_state(directory: Path) -> dict[str, Any] | None:
    """The committed state.json, or None when there is none (or it is unreadable)."""
    path = directory / STATE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if (directory / state["tensors"]).is_file() else None
