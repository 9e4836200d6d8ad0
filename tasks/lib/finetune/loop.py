"""The fine-tuning loop: keep training the pretrained network on the new images.

The notes' practice: train the head and the later blocks (early layers hold generic features,
late ones the original classes'), with a smaller learning rate for the pretrained body than
for the head, and start the head from a linear probe (linear-probe-then-fine-tune,
Kumar et al. 2022) so that the first steps don't wreck the pretrained features.

`fine_tune` takes what the stage shell (tasks/finetune.py) read and built: the network, the
train and val datasets (tasks/lib/finetune/data.py), where each phase's checkpoints go
(ftresume.Checkpoints); it returns what it did (Tuned: the best epoch, the curve, the
calibration) and leaves the best-on-val weights in the network. The shell writes them: this
module opens no file.

Each epoch ends with a checkpoint; a killed run continues from its last epoch and ends with
the same weights as an uninterrupted one (CPU, same seed): every epoch reseeds its shuffling,
augmentation and dropout from (seed, epoch). Early stopping on val.

The same loop runs on every rank of a torchrun launch (tasks/lib/ddp.py): the model in
DDP, a DistributedSampler's share of the train split per rank (per-process batch_size: the
effective batch is batch_size x world size), val scored in shards and gathered, the weights'
digest compared across ranks each epoch; rank 0 alone prints and calls the Checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tlflow.tasks.lib.core.device import autocast, resolve_device, set_cpu_threads
from tlflow.tasks.lib.core.params import Finetune, Train
from tlflow.tasks.lib.core.progress import Progress
from tlflow.tasks.lib.finetune.data import Images, Reader, loader, train_loader
from tlflow.tasks.lib.finetune.network import Network, freeze, train_mode
from tlflow.tasks.lib.finetune.resume import FRESH, Checkpoints, load_best, resume
from tlflow.tasks.lib.scale import ddp

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler

    from tlflow.tasks.lib.probe.head import Calibration, HeadMeta, LinearHead

say = ddp.say


def head_from_probe(codes: np.ndarray, labels: list[str], C: float, train: Train, seed: int,
                    meta: HeadMeta) -> LinearHead:
    """The head's start: a logistic probe (probes.make_probe, scikit-learn's, standardized)
    on the train split's pooled codes (N, D) and labels, at C (the sweep's choice for
    pooled), as a LinearHead with `meta`.

    Not the saved probe, which is refit on train + val: a head that has seen the val images
    scores them near 1.0 from step 0, and val could no longer tell epochs apart."""
    from tlflow.tasks.lib.probe.sweep import (  # scikit-learn: only for this start
        make_probe,
        to_head,
    )

    cfg = Train(classifier="logistic", C_grid=(C,), max_iter=train.max_iter,
                normalize="standardize", class_weight=train.class_weight)
    probe = make_probe(C, cfg, seed)
    probe.fit(codes, labels)
    return to_head(probe, meta)


def train_epoch(net: Network, batches, opt: torch.optim.Optimizer, sched: Scheduler,
                cfg: Finetune, device: torch.device, label: str, done: int,
                model: torch.nn.Module | None = None) -> float:
    """One pass over the train split (this rank's share), `done` updates into the run (the
    schedule's position), through `model` (DDP around net.model; net.model by default);
    returns the mean training loss over all ranks."""
    model = model or net.model
    model.train()
    train_mode(net, cfg.bn)
    # the loss is summed on the device: reading it each step would wait for the GPU
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    progress = Progress(label, len(batches.sampler)) if ddp.current().main else None
    try:
        for x, y in batches:
            x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(device, cfg.precision, allow_fp16=False):
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            sched.step_update(done)  # the next update's rates
            total += loss.detach().double() * len(y)
            n += len(y)
            if progress is not None:
                progress.advance(len(y))
    finally:
        if progress is not None:
            progress.close()
    total_all, n_all = ddp.all_sum([float(total), n])
    return total_all / max(n_all, 1)


@torch.inference_mode()
def logits(net: Network, batches, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """The network's class scores (N, K) for every image of the loader (eval mode)."""
    net.model.eval()
    out = []
    for x, _ in batches:
        x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
        with autocast(device, precision, allow_fp16=False):
            out.append(net.model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, len(net.classes)))


def val_temperature(net: Network, val: Images, cfg: Finetune,
                    device: torch.device) -> Calibration:
    """Temperature scaling of the chosen network on the val split's logits (trust.py): the
    record its sidecar keeps, which predict's --min-confidence divides the logits by."""
    from tlflow.tasks.lib.probe.trust import fit_network_temperature

    z = logits(net, loader(val, cfg, device, False), device, cfg.precision)
    record = fit_network_temperature(z, np.array(val.targets))
    say(f"finetune: temperature {record.temperature:.3f} on val (NLL "
        f"{record.nll:.4f} -> {record.nll_calibrated:.4f})")
    return record


def val_scores(net: Network, val: Images, cfg: Finetune,
               device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the val split; under torchrun each rank scores its
    shard and every rank gets all the scores, so all make the same choice."""
    part = (torch.utils.data.Subset(val, ddp.shard(len(val)))
            if ddp.current().distributed else val)
    z = torch.from_numpy(logits(net, loader(part, cfg, device, False), device, cfg.precision))
    z = ddp.gather_shards(z)
    y = torch.as_tensor(val.targets)
    return float((z.argmax(1) == y).float().mean()), float(F.cross_entropy(z, y))


def improves(acc: float, loss: float, best_acc: float, best_loss: float,
             min_delta: float = 1e-4) -> bool:
    """Higher val accuracy, or the same with a val loss lower by min_delta: on a small val
    split the accuracy ties often (a few dozen images), and the loss tells epochs apart."""
    return acc > best_acc or (acc == best_acc and loss < best_loss - min_delta)


@dataclass
class Phase:
    """One training phase's fixed inputs: what trains, where its checkpoints go."""

    cfg: Finetune
    checkpoints: Checkpoints
    fingerprint: str
    first_epoch: int = 1  # curve numbering: a second phase continues the first's


def run_phase(net: Network, phase: Phase, train_ds: Images, val_ds: Images, seed: int,
              device: torch.device) -> dict:
    """Train until epochs or patience run out, resuming a matching checkpoint; the returned
    state names the best epoch, whose weights are loaded into the network at the end."""
    cfg, ckpt = phase.cfg, phase.checkpoints
    ranks = ddp.current()
    freeze(net, cfg)
    steps = math.ceil(ddp.share(len(train_ds)) / cfg.batch_size)
    state, opt, sched = resume(net, cfg, ckpt, phase.fingerprint, steps)
    model = ddp.wrap(net.model, device)  # after freeze: DDP syncs what trains
    trained = sum(p.numel() for p in net.model.parameters() if p.requires_grad)
    where = f"{device}" + (f" x {ranks.world} processes" if ranks.distributed else "")
    say(f"finetune: {cfg.trainable} ({trained:,} parameters train) on {len(train_ds)} "
        f"images, {where}, up to {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}")

    epoch = state["epoch"]
    while epoch < cfg.epochs and not state["stopped_early"]:
        epoch += 1
        t0 = time.perf_counter()
        train_ds.epoch = epoch
        batches = train_loader(train_ds, cfg, device, seed + 7 * phase.first_epoch, epoch)
        loss = train_epoch(net, batches, opt, sched, cfg, device, f"finetune epoch {epoch}",
                           (epoch - 1) * steps, model)
        same = ""
        if ranks.distributed:  # BatchNorm statistics from rank 0, then every weight compared
            ddp.broadcast_buffers(net.model)
            digest = ddp.check_same_weights(net.model, epoch)
            same = (f", weights identical on {ranks.world} ranks (sha256 {digest[:12]})"
                    if ranks.world > 1 else f", weights sha256 {digest[:12]}")
        acc, val_loss = val_scores(net, val_ds, cfg, device)
        state["curve"].append({"epoch": phase.first_epoch + epoch - 1,
                               "train_loss": round(loss, 6), "val_accuracy": round(acc, 6)})
        better = improves(acc, val_loss, state["best_accuracy"], state["best_loss"])
        if better:
            state["best_file"] = f"best-{epoch:04d}.safetensors"
            if ranks.main:
                ckpt.save_best(state["best_file"], net.model)
            state.update(best_accuracy=acc, best_loss=val_loss, best_epoch=epoch)
        state["stopped_early"] = epoch - state["best_epoch"] >= cfg.patience
        if ranks.main:
            # the curve so far lives in the checkpoint's state; the output (plots/) is
            # written once the stage ends, so a killed run leaves the last good one in place
            ckpt.commit(epoch, net.model, opt, sched,
                        {**{k: state[k] for k in FRESH}, "fingerprint": phase.fingerprint})
        say(f"finetune: epoch {epoch}/{cfg.epochs} ({cfg.trainable}): train loss "
            f"{loss:.4f}, val accuracy {acc:.4f}{' (best)' if better else ''}, "
            f"{time.perf_counter() - t0:.1f} s{same}")
    if state["stopped_early"]:
        say(f"finetune: stopped early: no better val score for {cfg.patience} epochs")
    del model  # a later phase wraps the network anew (its own trainable parameters)
    load_best(net, ckpt, state["best_file"])
    state["epochs_run"] = epoch
    return state


@dataclass(frozen=True)
class Tuned:
    """What fine_tune did: the phases kept ("last_n_blocks", then "all" when it improved
    val), the best epoch (numbered along the whole curve), its val accuracy, whether the
    kept phase stopped early, the curve of every epoch run, and the temperature-scaling
    record on val (rank 0's; None on the other ranks)."""

    phases: list[str]
    best_epoch: int
    val_accuracy: float
    stopped_early: bool
    curve: list[dict]
    calibration: Calibration | None


def fine_tune(net: Network, train_ds: Images, val_ds: Images, cfg: Finetune, seed: int,
              device: torch.device, fingerprint: str, checkpoints: Checkpoints,
              then_all: Checkpoints | None = None) -> Tuned:
    """Fine-tune `net` (on `device`, its head already started) with cfg, resuming matching
    checkpoints; with `then_all` (the second phase's checkpoints), a second phase trains
    everything from the first's best weights, kept only if val improves. The network ends
    with the best-on-val weights."""
    first = run_phase(net, Phase(cfg, checkpoints, fingerprint), train_ds, val_ds, seed,
                      device)
    final, curve, phases = first, first["curve"], [cfg.trainable]
    if then_all is not None:
        every = cfg.model_copy(update={"trainable": "all"})
        say(f"finetune: then all layers, from the best {cfg.trainable} weights")
        second = run_phase(net, Phase(every, then_all, f"{fingerprint}+all",
                                      first["epochs_run"] + 1),
                           train_ds, val_ds, seed, device)
        curve = curve + second["curve"]
        if improves(second["best_accuracy"], second["best_loss"], first["best_accuracy"],
                    first["best_loss"]):
            final, phases = second, [cfg.trainable, "all"]
        else:
            say("finetune: all layers did not improve val; keeping the first phase")
            load_best(net, checkpoints, first["best_file"])
    main = ddp.current().main
    return Tuned(phases, final["curve"][final["best_epoch"] - 1]["epoch"],
                 final["best_accuracy"], final["stopped_early"], curve,
                 val_temperature(net, val_ds, cfg, device) if main else None)


def finetuned_probabilities(net: Network, items: Sequence[Any], read: Reader,
                            device_spec: str = "auto", batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities (N, K) of the fine-tuned network for images, each decoded by
    `read(item, transform)` (images.read_image for image files)."""
    from scipy.special import softmax

    device = resolve_device(device_spec, "finetune.device")
    ds = Images(items, [0] * len(items), read, net.backbone.transform())
    batches = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    set_cpu_threads(device, 0)
    net.model.to(device, memory_format=torch.channels_last)
    return softmax(logits(net, batches, device), axis=1)
