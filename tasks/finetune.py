"""Fine-tune: the optional stage that keeps training the pretrained network on the new images.

Off by default (finetune.enabled: false): the stage then writes a sidecar saying so, and
evaluate and predict know there is no fine-tuned network. On, it runs the loop in
tasks/lib/finetuning.py and writes <finetuned>.safetensors, its JSON sidecar and the curve.
From train it reads only the values it uses (base.paths.train_choice: the C chosen for the
pooled codes and the plan), so a train change that leaves them alone does not rerun it.
"""

from __future__ import annotations

from tasks.lib.finetuning import fine_tune, write_curve
from tasks.lib.handoff import TrainChoice, read_train_choice
from tasks.lib.network import save_disabled
from tasks.lib.params import Finetune, Params

# what this stage reads besides base.paths (dvc.yaml: params)
# (the input size comes from the current store: extract resolved extract.image_size)
PARAMS = ("base.seed", "extract.backbone", "extract.weights", "train.max_iter",
          "train.class_weight", "finetune", "advise.strategy")


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
    choice = read_train_choice(paths.train_choice)
    cfg, then_all, why = plan(params, choice)
    if cfg is None:
        save_disabled(paths.finetuned)
        write_curve(paths.finetune_curve, [])
        print(f"finetune: off ({why})", flush=True)
        return None
    return fine_tune(params, cfg, then_all, choice.pooled_C)
