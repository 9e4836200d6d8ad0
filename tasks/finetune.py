"""Fine-tune: the optional stage that keeps training the pretrained network on the new images.

Off by default (finetune.enabled: false): the stage then writes a sidecar saying so, and
evaluate and predict know there is no fine-tuned network. On, it runs the loop in
tasks/lib/finetuning.py and writes <finetuned>.safetensors, its JSON sidecar and the curve.
From train it reads only the values it uses (base.paths.train_choice: the C chosen for the
pooled codes and the plan), so a train change that leaves them alone does not rerun it.

Above one process (finetune.nproc_per_node x nnodes), the stage launches itself under
torchrun: `python -m torch.distributed.run ... -m tlflow.tasks.finetune JOB_DIR` runs `_worker` on
every rank (tasks/lib/distributed.py), with the params this stage declares, and waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tlflow.tasks.lib import torchrun
from tlflow.tasks.lib.handoff import TrainChoice
from tlflow.tasks.lib.params import Finetune, Params, parse_params, scoped

# what this stage reads besides base.paths (dvc.yaml: params)
# (the backbone, its weights and the input size come from train's choice: extract.compare's
# winner, at the size extract resolved extract.image_size to)
PARAMS = ("base.seed", "train.max_iter", "train.class_weight", "finetune", "advise.strategy")


def plan(params: Params, choice: TrainChoice) -> tuple[Finetune | None, bool, str]:
    """What to fine-tune: (config or None, then all layers?, why). advise.strategy manual
    follows finetune.enabled; otherwise the plan train carried out."""
    cfg = params.finetune
    if params.advise.strategy == "manual":
        return (cfg if cfg.enabled else None), False, "finetune.enabled"
    why = f"plan {choice.plan} (advise.strategy: {params.advise.strategy})"
    if choice.plan == "finetune_all":
        return cfg.model_copy(update={"trainable": "all"}), False, why
    if choice.plan == "finetune_top":
        return cfg.model_copy(update={"trainable": "last_n_blocks"}), True, why
    return None, False, why


def run(params: Params) -> dict | None:
    """Fine-tune when enabled or planned (resuming a matching checkpoint); else say so."""
    paths = params.base.paths
    choice = TrainChoice.read(paths.train_choice)
    cfg, then_all, why = plan(params, choice)
    if cfg is not None and torchrun.world_size(cfg) > 1:  # the ranks import torch, not this
        return launch(params, cfg, choice, then_all)
    from tlflow.tasks.lib.finetuning import fine_tune, write_curve
    from tlflow.tasks.lib.network import save_disabled

    if cfg is None:
        save_disabled(paths.finetuned)
        write_curve(paths.finetune_curve, [])
        print(f"finetune: off ({why})", flush=True)
        return None
    return fine_tune(params, cfg, choice, then_all)


def _declared(params: Params) -> dict[str, Any]:
    """The params this stage declares (PARAMS, base.paths, base.project) as JSON, for its
    ranks."""
    raw: dict[str, Any] = {}
    for key in (*PARAMS, "base.paths", "base.project"):
        *parents, last = key.split(".")
        node, source = raw, params
        for part in parents:
            node, source = node.setdefault(part, {}), getattr(source, part)
        value = getattr(source, last)
        node[last] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return raw


def launch(params: Params, cfg: Finetune, choice: TrainChoice,
           then_all: bool = False) -> dict | None:
    """Fine-tune under torchrun (DDP) on world_size(cfg) processes, even one; rank 0's
    sidecar values (None when rank 0 ran on another machine, which holds the outputs)."""
    job = {"params": _declared(params), "finetune": cfg.model_dump(mode="json"),
           "then_all": then_all, "choice": asdict(choice)}
    # the rendezvous id: the same on every machine that runs the same job
    run_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    result = torchrun.launch(__spec__.name if __spec__ else "tlflow.tasks.finetune", job, cfg,
                                run_id, params.base.paths.finetune_checkpoints)
    if result is None:
        print("finetune: rank 0 ran on another machine; its outputs are there", flush=True)
    return result


def _worker(job: dict[str, Any]) -> dict:
    """One rank of a torchrun launch: the same loop as one process, on its share."""
    from tlflow.tasks.lib import distributed
    from tlflow.tasks.lib.finetuning import fine_tune

    params = scoped(parse_params(job["params"], "the finetune job"), PARAMS)
    cfg = Finetune.model_validate(job["finetune"])
    distributed.start(cfg.device)
    return fine_tune(params, cfg, TrainChoice(**job["choice"]), job["then_all"])


if __name__ == "__main__":  # a rank, started by torchrun (see launch)
    from tlflow.tasks.lib.distributed import die_with_parent, worker

    die_with_parent()
    code = worker(Path(sys.argv[1]), _worker)
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written, closed and flushed: skip the interpreter's teardown of torch and
    # timm, which took 2-8 s per rank here (measured), while the stage waits for the last rank
    os._exit(code)
