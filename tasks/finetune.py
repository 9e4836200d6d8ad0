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
from tasks.io import atomic_path, write_json
from tasks.params import Params

FORMAT = "tlflow.finetuned/1"
CURVE_COLUMNS = ("epoch", "train_loss", "val_accuracy")


def save_disabled(stem: Path) -> None:
    """The stage's outputs when finetune.enabled is false: a sidecar that says so."""
    from safetensors.numpy import save_file

    with atomic_path(Path(f"{stem}.safetensors")) as tmp:
        save_file({}, str(tmp), metadata={"format": FORMAT, "enabled": "false"})
    write_json(Path(f"{stem}.json"), {"format": FORMAT, "enabled": False})


def read_meta(stem: Path) -> dict[str, Any]:
    """The sidecar; {"enabled": False} when the stage has not produced a network."""
    path = Path(f"{stem}.json")
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


def run(params: Params) -> dict | None:
    """Fine-tune when enabled (resuming a matching checkpoint); else say it is off."""
    paths = params.base.paths
    if not params.finetune.enabled:
        save_disabled(paths.finetuned)
        write_curve(paths.finetune_curve, [])
        print("finetune: disabled (finetune.enabled: false)", flush=True)
        return None
    from tasks.tuning import fine_tune

    return fine_tune(params)
