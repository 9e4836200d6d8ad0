"""Fine-tune: the optional stage that keeps training the pretrained network on the new images.

Off by default (finetune.enabled: false): the stage then writes a sidecar saying so, and
evaluate and predict know there is no fine-tuned network. On, this shell does every read and
write of the stage: it reads the manifest (less the images extract skipped), train's choice
and the pooled codes the head starts from, builds the network and the datasets, hands them to
the loop (tasks/lib/finetune/loop.py, with data, optim and resume: none of them opens a file)
with the checkpoints folder (CheckpointsFolder), and writes <finetuned>.safetensors, its JSON
sidecar (with the temperature found on val) and the curve.
From train it reads only the values it uses (base.paths.train_choice: the C chosen for the
pooled codes and the plan), so a train change that leaves them alone does not rerun it.

Above one process (finetune.nproc_per_node x nnodes), the stage launches itself under
torchrun: `python -m torch.distributed.run ... -m tlflow.tasks.finetune JOB_DIR` runs `_worker` on
every rank (tasks/lib/ddp.py), with the params this stage declares, and waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlflow.tasks.lib.core import checkpoint
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.handoff.finetune import FinetuneCurve
from tlflow.tasks.lib.core.handoff.train import TrainChoice
from tlflow.tasks.lib.core.params import Finetune, Params, parse_params
from tlflow.tasks.lib.core.scope import scoped
from tlflow.tasks.lib.data import ownership
from tlflow.tasks.lib.scale import torchrun

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tlflow.tasks.lib.data.manifest import Row
    from tlflow.tasks.lib.finetune.network import NetworkMeta
    from tlflow.tasks.lib.finetune.resume import Schedule
    from tlflow.tasks.lib.probe.head import LinearHead

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


def run(params: Params) -> NetworkMeta | None:
    """Fine-tune when enabled or planned (resuming a matching checkpoint); else say so. The
    checkpoints folder must be new, empty or tlflow's own (`ownership`), and is marked after."""
    paths = params.base.paths
    ownership.check_outputs("finetune", paths)
    result = _run(params)
    ownership.mark_outputs("finetune", paths)
    return result


def _run(params: Params) -> NetworkMeta | None:
    paths = params.base.paths
    choice = TrainChoice.read(paths.train_choice)
    cfg, then_all, why = plan(params, choice)
    if cfg is not None and torchrun.world_size(cfg) > 1:  # the ranks import torch, not this
        return launch(params, cfg, choice, then_all)
    from tlflow.tasks.lib.finetune.network import save_disabled

    if cfg is None:
        save_disabled(paths.finetuned)
        FinetuneCurve(points=()).write(paths.finetune_curve)
        print(f"finetune: off ({why})", flush=True)
        return None
    return fine_tune(params, cfg, choice, then_all)


@dataclass(frozen=True)
class CheckpointsFolder:
    """A phase's checkpoints in a folder (base.paths.finetune_checkpoints, its all/ for the
    second phase; the files are tasks/lib/core/checkpoint.py's): the ftresume.Checkpoints the
    loop is handed, called by rank 0 alone."""

    path: Path

    @property
    def where(self) -> str:
        return str(self.path)

    def state(self) -> dict[str, Any] | None:
        return checkpoint.load_state(self.path)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def start_afresh(self) -> None:
        """Drop the tensors an older run left (other inputs, or damaged); make the folder."""
        for old in checkpoint.own_tensors(self.path):
            old.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def commit(self, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
               sched: Schedule, meta: dict[str, Any]) -> None:
        from tlflow.tasks.lib.finetune.resume import pack

        checkpoint.save(self.path, *pack(epoch, model, opt, sched, meta))

    def save_best(self, name: str, model: nn.Module) -> None:
        from tlflow.tasks.lib.finetune.network import state_tensors

        checkpoint.save_weights(self.path / name, state_tensors(model))


def probe_for_init(params: Params, train_rows: list[Row], choice: TrainChoice) -> LinearHead:
    """The head's start: a logistic probe on the chosen store's pooled codes of the train
    split only (finetune.loop.head_from_probe), at the C the sweep chose for pooled (train.C_grid on
    val; 1.0 when it was not swept)."""
    from tlflow.tasks.lib.core.handoff.extract import chosen_store
    from tlflow.tasks.lib.features.backbones import POOLED
    from tlflow.tasks.lib.features.store import FeatureStore
    from tlflow.tasks.lib.finetune.loop import head_from_probe
    from tlflow.tasks.lib.probe.head import HeadMeta
    from tlflow.tasks.lib.scale.ddp import say

    paths = params.base.paths
    store = chosen_store(paths.features, choice.extractor_id, paths.train_choice)
    with FeatureStore(store) as s:
        if POOLED not in s.layers:
            raise TlflowError("finetune.init_head: probe needs pooled codes in the store "
                              "(add pooled to extract.layers) or init_head: random")
        x = s.read(POOLED, [r.sha256 for r in train_rows])
    C = 1.0 if choice.pooled_C is None else choice.pooled_C
    head = head_from_probe(x, [r.label for r in train_rows], C, params.train, params.base.seed,
                           HeadMeta(layer=POOLED, extractor_id=store.stem))
    say(f"finetune: the head starts from a probe on the train split's {POOLED} codes "
        f"(C={C:g})")
    return head


def fine_tune(params: Params, cfg: Finetune, choice: TrainChoice,
              then_all: bool = False) -> NetworkMeta:
    """Fine-tune (cfg, default params.finetune) on this process's share: read the inputs,
    build the network (train's backbone: extract.compare's winner, its head from a
    train-split probe at the choice's pooled C) and the datasets, run finetune.loop.fine_tune
    (resuming matching checkpoints; with then_all a second phase trains everything), then
    write the best-on-val network, its sidecar and the curve (rank 0, under torchrun) and
    clear the checkpoints. Returns the sidecar (without the tensors' sha256)."""
    import torch

    from tlflow.tasks.lib.core.codedeps import code_hash
    from tlflow.tasks.lib.core.files import sha256_file
    from tlflow.tasks.lib.core.handoff.extract import ExtractReport
    from tlflow.tasks.lib.data.decode import read_image
    from tlflow.tasks.lib.data.manifest import of_split, read_manifest, without
    from tlflow.tasks.lib.finetune.data import Images, class_indices, train_augment
    from tlflow.tasks.lib.finetune.loop import fine_tune as loop
    from tlflow.tasks.lib.finetune.network import build, init_from_probe, save_network, sidecar
    from tlflow.tasks.lib.finetune.resume import fingerprint
    from tlflow.tasks.lib.scale import ddp

    paths, seed = params.base.paths, params.base.seed
    bad = ExtractReport.read(paths.extract_report).bad
    rows = without(read_manifest(paths.manifest), bad)
    train_rows, val_rows = of_split(rows, "train"), of_split(rows, "val")
    if not val_rows:
        raise TlflowError("finetune: the val split is empty; early stopping and the best "
                          "epoch need one (set ingest.val_fraction above 0)")
    classes = tuple(sorted({r.label for r in train_rows + val_rows}))  # as the probe's
    image_size = cfg.image_size or choice.input_size
    device = ddp.device_for(cfg.device)

    net = build(choice.backbone, choice.weights, image_size, seed, classes)
    if cfg.init_head == "probe":
        init_from_probe(net, probe_for_init(params, train_rows, choice))
    net.model.to(device, memory_format=torch.channels_last)

    def images(split: list[Row], **augment: Any) -> Images:
        return Images([paths.images / r.relpath for r in split],
                      class_indices([r.label for r in split], classes), read_image,
                      net.backbone.transform(), **augment)

    train_ds = images(train_rows, augment=train_augment(net, cfg), seed=seed)
    val_ds = images(val_rows)
    key = fingerprint(params, cfg, sha256_file(paths.manifest), sorted(bad), choice.backbone,
                      choice.weights, choice.pooled_C, image_size, code_hash("finetune"))
    ckpt = paths.finetune_checkpoints
    tuned = loop(net, train_ds, val_ds, cfg, seed, device, key, CheckpointsFolder(ckpt),
                 CheckpointsFolder(ckpt / "all") if then_all else None)
    meta = sidecar(net, trainable="+".join(tuned.phases), n_blocks=cfg.n_blocks,
                   init_head=cfg.init_head, image_size=image_size,
                   best_epoch=tuned.best_epoch, val_accuracy=tuned.val_accuracy,
                   epochs_run=len(tuned.curve), stopped_early=tuned.stopped_early,
                   calibration=tuned.calibration)
    if ddp.current().main:
        net.model.to("cpu", memory_format=torch.contiguous_format)
        save_network(net, paths.finetuned, meta)
        FinetuneCurve(points=tuple(tuned.curve)).write(paths.finetune_curve)
        checkpoint.clear(ckpt)  # done: a rerun (forced, or new code) starts afresh
    ddp.say(f"finetune: best epoch {meta.best_epoch}, val accuracy "
            f"{meta.val_accuracy:.4f} -> {paths.finetuned}")
    return meta


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
           then_all: bool = False) -> NetworkMeta | None:
    """Fine-tune under torchrun (DDP) on world_size(cfg) processes, even one; rank 0's
    sidecar (None when rank 0 ran on another machine, which holds the outputs)."""
    job = {"params": _declared(params), "finetune": cfg.model_dump(mode="json"),
           "then_all": then_all, "choice": choice.model_dump()}
    # the rendezvous id: the same on every machine that runs the same job
    run_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    result = torchrun.launch(__spec__.name if __spec__ else "tlflow.tasks.finetune", job, cfg,
                                run_id, params.base.paths.finetune_checkpoints)
    if result is None:
        print("finetune: rank 0 ran on another machine; its outputs are there", flush=True)
        return None
    from tlflow.tasks.lib.finetune.network import NetworkMeta

    return NetworkMeta.model_validate(result)


def _worker(job: dict[str, Any]) -> dict:
    """One rank of a torchrun launch: the same loop as one process, on its share; the
    sidecar as JSON (rank 0's is launch's result)."""
    from tlflow.tasks.lib.scale import ddp

    params = scoped(parse_params(job["params"], "the finetune job"), PARAMS)
    cfg = Finetune.model_validate(job["finetune"])
    ddp.start(cfg.device)
    return fine_tune(params, cfg, TrainChoice(**job["choice"]), job["then_all"]).as_json()


if __name__ == "__main__":  # a rank, started by torchrun (see launch)
    from tlflow.tasks.lib.scale.ddp import die_with_parent, worker

    die_with_parent()
    code = worker(Path(sys.argv[1]), _worker)
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written, closed and flushed: skip the interpreter's teardown of torch and
    # timm, which took 2-8 s per rank here (measured), while the stage waits for the last rank
    os._exit(code)
