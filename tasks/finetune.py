"""Fine-tune: the optional stage that keeps training the pretrained network on the new images.

Off by default (finetune.enabled: false): the stage then writes a sidecar saying so, without
importing torch, and evaluate and predict know there is no fine-tuned network. On, it runs the
loop in tasks/tuning.py and writes <finetuned>.safetensors, its JSON sidecar and the learning
curve.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tasks.errors import TlflowError
from tasks.head import meta_path, tensors_path
from tasks.io import atomic_path, write_json
from tasks.params import Finetune, Params

FORMAT = "tlflow.finetuned/1"
CURVE_COLUMNS = ("epoch", "train_loss", "val_accuracy")


def save_disabled(stem: Path) -> None:
    """The stage's outputs when finetune.enabled is false: a sidecar that says so."""
    from safetensors.numpy import save_file

    with atomic_path(tensors_path(stem)) as tmp:
        save_file({}, str(tmp), metadata={"format": FORMAT, "enabled": "false"})
    write_json(meta_path(stem), {"format": FORMAT, "enabled": False})


def read_meta(stem: Path) -> dict[str, Any]:
    """The sidecar; {"enabled": False} when the stage has not produced a network."""
    path = meta_path(stem)
    if not path.is_file():
        return {"enabled": False}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TlflowError(f"{path}: not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise TlflowError(f"{path}: not a {FORMAT} sidecar")
    return meta


def write_curve(dest: Path, curve: list[dict]) -> None:
    """plots/finetune.csv: epoch, train loss, val accuracy (for `dvc plots show`)."""
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CURVE_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(curve)


def plan(params: Params) -> tuple[Finetune | None, bool, str]:
    """What to fine-tune: (config or None, then all layers?, why). advise.strategy manual
    follows finetune.enabled; otherwise the plan train wrote to metrics/strategy.json."""
    cfg = params.finetune
    if params.advise.strategy == "manual":
        return (cfg if cfg.enabled else None), False, "finetune.enabled"
    path = params.base.paths.strategy
    if not path.is_file():
        raise TlflowError(f"{path}: not found (run `tlflow stage train` first)")
    chosen = json.loads(path.read_text())["plan"]
    why = f"plan {chosen} ({path})"
    if chosen == "finetune_all":
        return cfg.model_copy(update={"trainable": "all"}), False, why
    if chosen == "finetune_top":
        return cfg.model_copy(update={"trainable": "last_n_blocks"}), True, why
    return None, False, why


def run(params: Params) -> dict | None:
    """Fine-tune when enabled or planned (resuming a matching checkpoint); else say so."""
    paths = params.base.paths
    cfg, then_all, why = plan(params)
    if cfg is None:
        save_disabled(paths.finetuned)
        write_curve(paths.finetune_curve, [])
        print(f"finetune: off ({why})", flush=True)
        return None
    from tasks.tuning import fine_tune

    return fine_tune(params, cfg, then_all)
