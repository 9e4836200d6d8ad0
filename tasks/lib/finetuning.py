"""The fine-tuning loop: keep training the pretrained network on the new images.

The notes' practice: train the head and the later blocks (early layers hold generic features,
late ones the original classes'), with a smaller learning rate for the pretrained body than
for the head, and start the head from a linear probe (linear-probe-then-fine-tune,
Kumar et al. 2022) so that the first steps don't wreck the pretrained features.

The optimizer is timm's (timm.optim.create_optimizer_v2: AdamW or Nesterov SGD) on tlflow's
own parameter groups (network.param_groups says why not timm's layer-decay groups), and the
rates follow timm's CosineLRScheduler with a linear warm-up, stepped after every update.

Each epoch ends with a checkpoint (tasks/lib/checkpoint.py); a killed run continues from its last
epoch and ends with the same weights as an uninterrupted one (CPU, same seed): every epoch
reseeds its shuffling, augmentation and dropout from (seed, epoch). Early stopping on val; the
best-on-val weights go to <finetuned>.safetensors with a JSON sidecar.

The same loop runs on every rank of a torchrun launch (tasks/lib/distributed.py): the model in
DDP, a DistributedSampler's share of the train split per rank (per-process batch_size: the
effective batch is batch_size x world size), val scored in shards and gathered, the weights'
digest compared across ranks each epoch; rank 0 alone prints, reads checkpoints and writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tlflow.tasks.lib import checkpoint, distributed
from tlflow.tasks.lib.backbones import POOLED
from tlflow.tasks.lib.codedeps import code_hash
from tlflow.tasks.lib.device import autocast, resolve_device, resolve_workers, set_cpu_threads
from tlflow.tasks.lib.errors import TlflowError
from tlflow.tasks.lib.featurestore import FeatureStore
from tlflow.tasks.lib.files import atomic_path, sha256_file
from tlflow.tasks.lib.handoff import ExtractReport, TrainChoice, chosen_store
from tlflow.tasks.lib.head import LinearHead
from tlflow.tasks.lib.images import read_image
from tlflow.tasks.lib.manifest import Row, of_split, read_manifest, without
from tlflow.tasks.lib.network import (
    Network,
    build,
    freeze,
    init_from_probe,
    param_groups,
    save_network,
    train_mode,
)
from tlflow.tasks.lib.params import Finetune, Params, Train
from tlflow.tasks.lib.progress import Progress

if TYPE_CHECKING:
    from timm.scheduler import CosineLRScheduler
    from timm.scheduler.scheduler import Scheduler

CURVE_COLUMNS = ("epoch", "train_loss", "val_accuracy")
_RANK_STRIDE = 1_000_003  # dropout seeds of rank r: the epoch's seed + r * this


def _say(message: str) -> None:
    """A line of the stage's output: printed by rank 0 only (all of it on one process)."""
    if distributed.current().main:
        print(message, flush=True)


def write_curve(dest: Path, curve: list[dict]) -> None:
    """plots/finetune.csv: epoch, train loss, val accuracy (for `dvc plots show`)."""
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CURVE_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(curve)


class Images(torch.utils.data.Dataset):
    """(image tensor, class index) for manifest rows; files under the ingest snapshot.

    With `augment`, image i of epoch e is augmented by a random.Random of its own, seeded
    from (seed, e, i): the same crops and flips whatever the loader's workers, threads or
    order, and no draw from a process-global generator another library may share.
    """

    def __init__(self, rows: list[Row], root: Path, classes: tuple[str, ...],
                 transform: Callable, augment: Augment | None = None, seed: int = 0) -> None:
        index = {c: i for i, c in enumerate(classes)}
        self.files = [root / r.relpath for r in rows]
        self.targets = [index[r.label] for r in rows]
        self.transform, self.augment, self.seed, self.epoch = transform, augment, seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.augment is None:
            return read_image(self.files[i], self.transform), self.targets[i]
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        return read_image(self.files[i], lambda img: self.augment(img, rng)), self.targets[i]


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random resized crop (torchvision's RandomResizedCrop sampling,
    Szegedy et al. 2015), horizontal flip, then the model's normalization; every draw from
    the `rng` given, never from a global generator."""

    size: int
    scale: tuple[float, float]
    hflip: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, as torchvision's get_params draws it."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height  # fallback: the whole image, center crop to the ratio range
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        top, left, h, w = self.crop_box(*img.size, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              InterpolationMode(self.interpolation), antialias=True)
        if rng.random() < self.hflip:
            img = TF.hflip(img)
        return TF.normalize(TF.to_tensor(img), list(self.mean), list(self.std))


def train_augment(net: Network, cfg: Finetune) -> Augment:
    """The augmentation at the network's input size, with its own normalization."""
    dc = net.backbone.data_config
    return Augment(dc["input_size"][-1], cfg.crop_scale, cfg.hflip, dc["interpolation"],
                   tuple(dc["mean"]), tuple(dc["std"]))


def _epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The shuffling of one epoch, from (seed, epoch) alone. torch's default generator is
    reseeded too: dropout and drop-path draw from it (torch offers them no generator), and
    only torch ops draw from it, in this thread, during the epoch; each rank draws its own."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s + _RANK_STRIDE * rank)
    return torch.Generator().manual_seed(s)


def _loader(ds: torch.utils.data.Dataset, cfg: Finetune, device: torch.device, shuffle: bool,
            generator: torch.Generator | None = None,
            sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    workers = resolve_workers(cfg.num_workers, device, most=4)
    set_cpu_threads(device, workers)
    return torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator, sampler=sampler,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=False,
    )


def train_loader(ds: Images, cfg: Finetune, device: torch.device, seed: int,
                 epoch: int) -> torch.utils.data.DataLoader:
    """The epoch's shuffled train batches: on one process a permutation drawn from
    (seed, epoch); under torchrun this rank's share of a DistributedSampler seeded alike
    (seed, with set_epoch) on every rank, so the shares partition one permutation."""
    r = distributed.current()
    generator = _epoch_generator(seed, epoch, r.rank)
    if not r.distributed:
        return _loader(ds, cfg, device, True, generator)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=r.world, rank=r.rank,
                                                  shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return _loader(ds, cfg, device, False, sampler=sampler)


def train_epoch(net: Network, loader, opt: torch.optim.Optimizer, sched: Scheduler,
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
    progress = Progress(label, len(loader.sampler)) if distributed.current().main else None
    try:
        for x, y in loader:
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
    total_all, n_all = distributed.all_sum([float(total), n])
    return total_all / max(n_all, 1)


@torch.inference_mode()
def logits(net: Network, loader, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """The network's class scores for every image of the loader (eval mode)."""
    net.model.eval()
    out = []
    for x, _ in loader:
        x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
        with autocast(device, precision, allow_fp16=False):
            out.append(net.model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, len(net.classes)))


def val_temperature(net: Network, val: Images, rows: list[Row], cfg: Finetune,
                    device: torch.device) -> dict:
    """Temperature scaling of the chosen network on the val split's logits (trust.py): the
    record its sidecar keeps, which predict's --min-confidence divides the logits by."""
    from tlflow.tasks.lib.trust import fit_network_temperature

    z = logits(net, _loader(val, cfg, device, False), device, cfg.precision)
    y_idx = np.array([net.classes.index(r.label) for r in rows])
    record = fit_network_temperature(z, y_idx)
    _say(f"finetune: temperature {record['temperature']:.3f} on val (NLL "
         f"{record['nll']:.4f} -> {record['nll_calibrated']:.4f})")
    return record


def val_scores(net: Network, val: Images, cfg: Finetune,
               device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the val split; under torchrun each rank scores its
    shard and every rank gets all the scores, so all make the same choice."""
    part = (torch.utils.data.Subset(val, distributed.shard(len(val)))
            if distributed.current().distributed else val)
    z = torch.from_numpy(logits(net, _loader(part, cfg, device, False), device, cfg.precision))
    z = distributed.gather_shards(z)
    y = torch.as_tensor(val.targets)
    return float((z.argmax(1) == y).float().mean()), float(F.cross_entropy(z, y))


def improves(acc: float, loss: float, best_acc: float, best_loss: float,
             min_delta: float = 1e-4) -> bool:
    """Higher val accuracy, or the same with a val loss lower by min_delta: on a small val
    split the accuracy ties often (a few dozen images), and the loss tells epochs apart."""
    return acc > best_acc or (acc == best_acc and loss < best_loss - min_delta)


def make_optimizer(net: Network, cfg: Finetune) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2 on tlflow's own parameter groups (network.param_groups:
    head at lr, body at lr * backbone_lr_ratio times layer_decay per block; no weight decay on
    1-d tensors; frozen parameters in no group): AdamW, or SGD with Nesterov momentum (timm's
    'sgd'; 'momentum', i.e. plain SGD, when momentum is 0: Nesterov needs momentum > 0).

    timm's own grouping (create_optimizer_v2(model, layer_decay=...), i.e.
    param_groups_layer_decay over the model's group_matcher) is not used: it has no head/body
    ratio and counts every sub-block as a layer. Measured on tf_efficientnet_lite0 with
    lr 1e-2, backbone_lr_ratio 0.1, layer_decay 0.5: required / timm's lr for conv_head
    1e-3 / 5e-3, blocks.6 1e-3 / 5e-3, blocks.4 5e-4 / 3.9e-5, conv_stem 3.1e-5 / 7.6e-8
    (36 timm groups against 14)."""
    import timm.optim

    groups = param_groups(net, cfg)
    if cfg.optimizer == "sgd":
        name = "sgd" if cfg.momentum > 0 else "momentum"
        return timm.optim.create_optimizer_v2(groups, name, lr=cfg.lr, momentum=cfg.momentum)
    return timm.optim.create_optimizer_v2(groups, "adamw", lr=cfg.lr)


def make_schedule(opt: torch.optim.Optimizer, steps_per_epoch: int,
                  cfg: Finetune) -> CosineLRScheduler:
    """timm.scheduler.CosineLRScheduler over the run's updates (t_in_epochs=False, stepped by
    `step_update(updates done)` after each one): update t of the W = round(warmup_epochs *
    steps_per_epoch) warm-up updates runs at lr * t / W (from warmup_lr_init 0), then
    update t >= W at lr * (1 + cos(pi * (t - W) / (T - W))) / 2, reaching 0 at T =
    steps_per_epoch * epochs (SGDR's cosine, Loshchilov & Hutter 2017, without restarts).
    Each group keeps its own rate: its lr at construction is its base value."""
    from timm.scheduler import CosineLRScheduler

    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=0.0,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)


def _optimizer_and_schedule(net: Network, cfg: Finetune, steps_per_epoch: int
                            ) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """A fresh optimizer and its warm-up + cosine schedule over the whole run."""
    opt = make_optimizer(net, cfg)
    return opt, make_schedule(opt, steps_per_epoch, cfg)


# ---------------------------------------------------------------- the probe as a start


def probe_for_init(params: Params, train_rows: list[Row], choice: TrainChoice) -> LinearHead:
    """The head's start: a logistic probe on the store's pooled codes of the train split only,
    at the C the sweep chose for pooled (train.C_grid on val; 1.0 when it was not swept).

    Not the saved probe, which is refit on train + val: a head that has seen the val images
    scores them near 1.0 from step 0, and val could no longer tell epochs apart."""
    from tlflow.tasks.lib.probes import make_probe, to_head  # scikit-learn: only for this start

    paths = params.base.paths
    store = chosen_store(paths.features, choice.extractor_id, paths.train_choice)
    with FeatureStore(store) as s:
        if POOLED not in s.layers:
            raise TlflowError("finetune.init_head: probe needs pooled codes in the store "
                              "(add pooled to extract.layers) or init_head: random")
        x = s.read(POOLED, [r.sha256 for r in train_rows])
    C = 1.0 if choice.pooled_C is None else choice.pooled_C
    cfg = Train(classifier="logistic", C_grid=(C,), max_iter=params.train.max_iter,
                normalize="standardize", class_weight=params.train.class_weight)
    probe = make_probe(C, cfg, params.base.seed)
    probe.fit(x, [r.label for r in train_rows])
    _say(f"finetune: the head starts from a probe on the train split's {POOLED} codes "
         f"(C={C:g})")
    return to_head(probe, {"layer": POOLED, "extractor_id": store.stem})


# ---------------------------------------------------------------- the shell


def _fingerprint(params: Params, cfg: Finetune, manifest: Path, skipped: list[str],
                 choice: TrainChoice, image_size: int) -> str:
    """What a checkpoint must share with this run to be resumed by it: params, data, the
    backbone and the head's start, and the code of the fine-tune stage (its derived code
    deps)."""
    blob = json.dumps({  # where the machines meet changes nothing of the result
        "finetune": cfg.model_dump(mode="json", exclude={"rdzv_endpoint"}),
        "seed": params.base.seed,
        "backbone": choice.backbone, "weights": choice.weights, "image_size": image_size,
        "manifest": sha256_file(manifest), "skipped": skipped, "pooled_C": choice.pooled_C,
        "max_iter": params.train.max_iter, "class_weight": params.train.class_weight,
        "code": code_hash("finetune"),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# A phase's progress, as a checkpoint keeps it (besides the epoch and the tensors).
_FRESH = {"curve": [], "best_accuracy": -1.0, "best_loss": math.inf, "best_epoch": 0,
          "best_file": None, "stopped_early": False}


@dataclass
class Phase:
    """One training phase's fixed inputs: what trains, where its checkpoints go."""

    cfg: Finetune
    ckpt: Path
    fingerprint: str
    first_epoch: int = 1  # curve numbering: a second phase continues the first's


def _committed(ckpt: Path, fingerprint: str) -> tuple[dict, bytes] | None:
    """The checkpoint this run may resume (state.json and its tensor file's bytes), as rank 0
    reads it, on every rank; None when there is none or it belongs to other inputs."""
    found = None
    if distributed.current().main:
        state = checkpoint.load_state(ckpt)
        if state is not None and state.get("fingerprint") == fingerprint:
            found = (state, (ckpt / state["tensors"]).read_bytes())
    state = distributed.broadcast_json(found[0] if found else None)
    if state is None:
        return None
    return state, distributed.broadcast_bytes(found[1] if found else None)


def _resume(net: Network, phase: Phase, steps: int
            ) -> tuple[dict | None, torch.optim.Optimizer, CosineLRScheduler]:
    """A fresh optimizer and schedule, and the state of a matching checkpoint loaded into
    them and the network (None: start afresh). Every rank decides alike: same bytes."""
    opt, sched = _optimizer_and_schedule(net, phase.cfg, steps)
    found = _committed(phase.ckpt, phase.fingerprint)
    if found is None:
        return None, opt, sched
    state, blob = found
    initial = {k: v.clone() for k, v in net.model.state_dict().items()}
    try:
        checkpoint.restore(phase.ckpt, state, net.model, opt, sched, blob)
    except Exception as err:  # a damaged or foreign checkpoint: never fatal, start afresh
        _say(f"finetune: {phase.ckpt} unusable ({type(err).__name__}: {err}); starting afresh")
        net.model.load_state_dict(initial)
        return None, *_optimizer_and_schedule(net, phase.cfg, steps)
    _say(f"finetune: resuming after epoch {state['epoch']} from {phase.ckpt}")
    return state, opt, sched


def _load_best(net: Network, path: Path) -> None:
    """The best epoch's weights into the network: read by rank 0, sent to the others."""
    if distributed.current().main:
        checkpoint.load_weights(path, net.model)
    distributed.broadcast_state(net.model)


def run_phase(net: Network, phase: Phase, train_ds: Images, val_ds: Images, seed: int,
              device: torch.device) -> dict:
    """Train until epochs or patience run out, resuming a matching checkpoint; the returned
    state names the best epoch, whose weights are loaded into the network at the end."""
    cfg, ckpt = phase.cfg, phase.ckpt
    ranks = distributed.current()
    freeze(net, cfg)
    steps = math.ceil(distributed.share(len(train_ds)) / cfg.batch_size)
    state, opt, sched = _resume(net, phase, steps)
    if state is None:
        if ranks.main:
            for old in checkpoint.own_tensors(ckpt):
                old.unlink()
            ckpt.mkdir(parents=True, exist_ok=True)
        state = {"epoch": 0, **_FRESH, "curve": []}
    model = distributed.wrap(net.model, device)  # after freeze: DDP syncs what trains
    trained = sum(p.numel() for p in net.model.parameters() if p.requires_grad)
    where = f"{device}" + (f" x {ranks.world} processes" if ranks.distributed else "")
    _say(f"finetune: {cfg.trainable} ({trained:,} parameters train) on {len(train_ds)} "
         f"images, {where}, up to {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}")

    epoch = state["epoch"]
    while epoch < cfg.epochs and not state["stopped_early"]:
        epoch += 1
        t0 = time.perf_counter()
        train_ds.epoch = epoch
        loader = train_loader(train_ds, cfg, device, seed + 7 * phase.first_epoch, epoch)
        loss = train_epoch(net, loader, opt, sched, cfg, device, f"finetune epoch {epoch}",
                           (epoch - 1) * steps, model)
        same = ""
        if ranks.distributed:  # BatchNorm statistics from rank 0, then every weight compared
            distributed.broadcast_buffers(net.model)
            digest = distributed.check_same_weights(net.model, epoch)
            same = (f", weights identical on {ranks.world} ranks (sha256 {digest[:12]})"
                    if ranks.world > 1 else f", weights sha256 {digest[:12]}")
        acc, val_loss = val_scores(net, val_ds, cfg, device)
        state["curve"].append({"epoch": phase.first_epoch + epoch - 1,
                               "train_loss": round(loss, 6), "val_accuracy": round(acc, 6)})
        better = improves(acc, val_loss, state["best_accuracy"], state["best_loss"])
        if better:
            state["best_file"] = f"best-{epoch:04d}.safetensors"
            if ranks.main:
                checkpoint.save_weights(ckpt / state["best_file"], net.model)
            state.update(best_accuracy=acc, best_loss=val_loss, best_epoch=epoch)
        state["stopped_early"] = epoch - state["best_epoch"] >= cfg.patience
        if ranks.main:
            # the curve so far lives in the checkpoint's state; the output (plots/) is
            # written once the stage ends, so a killed run leaves the last good one in place
            checkpoint.save(ckpt, epoch, net.model, opt, sched,
                            {**{k: state[k] for k in _FRESH}, "fingerprint": phase.fingerprint})
        _say(f"finetune: epoch {epoch}/{cfg.epochs} ({cfg.trainable}): train loss "
             f"{loss:.4f}, val accuracy {acc:.4f}{' (best)' if better else ''}, "
             f"{time.perf_counter() - t0:.1f} s{same}")
    if state["stopped_early"]:
        _say(f"finetune: stopped early: no better val score for {cfg.patience} epochs")
    del model  # a later phase wraps the network anew (its own trainable parameters)
    _load_best(net, ckpt / state["best_file"])
    state["epochs_run"] = epoch
    return state


def fine_tune(params: Params, cfg: Finetune, choice: TrainChoice,
              then_all: bool = False) -> dict:
    """Fine-tune (cfg, default params.finetune), resuming matching checkpoints; with then_all,
    a second phase trains everything from the first's best weights, kept only if val
    improves. The backbone is train's choice (extract.compare's winner), its head starts
    from a train-split probe at the choice's pooled C. Saves the best-on-val network, its
    sidecar and the learning curve (rank 0, under torchrun)."""
    paths, seed = params.base.paths, params.base.seed
    main = distributed.current().main
    bad = ExtractReport.read(paths.extract_report).bad
    rows = without(read_manifest(paths.manifest), bad)
    train_rows, val_rows = of_split(rows, "train"), of_split(rows, "val")
    if not val_rows:
        raise TlflowError("finetune: the val split is empty; early stopping and the best "
                          "epoch need one (set ingest.val_fraction above 0)")
    classes = tuple(sorted({r.label for r in train_rows + val_rows}))  # as the probe's
    image_size = cfg.image_size or choice.input_size
    device = distributed.device_for(cfg.device)

    net = build(choice.backbone, choice.weights, image_size, seed, classes)
    if cfg.init_head == "probe":
        init_from_probe(net, probe_for_init(params, train_rows, choice))
    net.model.to(device, memory_format=torch.channels_last)
    train_ds = Images(train_rows, paths.images, classes, net.backbone.transform(),
                      train_augment(net, cfg), seed)
    val_ds = Images(val_rows, paths.images, classes, net.backbone.transform())
    fingerprint = _fingerprint(params, cfg, paths.manifest, sorted(bad), choice, image_size)
    ckpt = paths.finetune_checkpoints
    first = run_phase(net, Phase(cfg, ckpt, fingerprint), train_ds, val_ds, seed, device)
    final, curve, phases = first, first["curve"], [cfg.trainable]
    if then_all:
        every = cfg.model_copy(update={"trainable": "all"})
        _say(f"finetune: then all layers, from the best {cfg.trainable} weights")
        second = run_phase(net, Phase(every, ckpt / "all", f"{fingerprint}+all",
                                      first["epochs_run"] + 1),
                           train_ds, val_ds, seed, device)
        curve = curve + second["curve"]
        if improves(second["best_accuracy"], second["best_loss"], first["best_accuracy"],
                    first["best_loss"]):
            final, phases = second, [cfg.trainable, "all"]
        else:
            _say("finetune: all layers did not improve val; keeping the first phase")
            _load_best(net, ckpt / first["best_file"])
    calibrated = val_temperature(net, val_ds, val_rows, cfg, device) if main else None
    meta = {"trainable": "+".join(phases), "n_blocks": cfg.n_blocks,
            "init_head": cfg.init_head, "image_size": image_size,
            "best_epoch": final["curve"][final["best_epoch"] - 1]["epoch"],
            "val_accuracy": final["best_accuracy"], "epochs_run": len(curve),
            "stopped_early": final["stopped_early"], "calibration": calibrated}
    if main:
        net.model.to("cpu", memory_format=torch.contiguous_format)
        save_network(net, paths.finetuned, meta)
        write_curve(paths.finetune_curve, curve)
        checkpoint.clear(ckpt)  # done: a rerun (forced, or new code) starts afresh
    _say(f"finetune: best epoch {meta['best_epoch']}, val accuracy "
         f"{meta['val_accuracy']:.4f} -> {paths.finetuned}")
    return meta


def finetuned_probabilities(net: Network, files: list[Path], device_spec: str = "auto",
                            batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities (N, K) of the fine-tuned network for image files."""
    from scipy.special import softmax

    device = resolve_device(device_spec, "finetune.device")
    ds = Images([Row(str(f), "", net.classes[0], "test") for f in files], Path(), net.classes,
                net.backbone.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    set_cpu_threads(device, 0)
    net.model.to(device, memory_format=torch.channels_last)
    return softmax(logits(net, loader, device), axis=1)
