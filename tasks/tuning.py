"""The fine-tuning loop: keep training the pretrained network on the new images.

The notes' practice: train the head and the later blocks (early layers hold generic features,
late ones the original classes'), with a smaller learning rate for the pretrained body than
for the head, and start the head from a linear probe (linear-probe-then-fine-tune,
Kumar et al. 2022) so that the first steps don't wreck the pretrained features.

Each epoch ends with a checkpoint (tasks/checkpoint.py); a killed run continues from its last
epoch and ends with the same weights as an uninterrupted one (CPU, same seed): every epoch
reseeds its shuffling, augmentation and dropout from (seed, epoch). Early stopping on val; the
best-on-val weights go to <finetuned>.safetensors with a JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks import checkpoint, network
from tasks.errors import TlflowError
from tasks.extract import autocast, read_image, resolve_device, resolve_workers
from tasks.featurestore import FeatureStore, bad_images, current_store, usable
from tasks.head import LinearHead
from tasks.ingest import Row, read_manifest
from tasks.io import sha256_file
from tasks.network import (
    Network,
    build,
    freeze,
    init_from_probe,
    param_groups,
    save_network,
    train_mode,
)
from tasks.params import Finetune, Params
from tasks.progress import Progress


class Images(torch.utils.data.Dataset):
    """(image tensor, class index) for manifest rows; files under the ingest snapshot."""

    def __init__(self, rows: list[Row], root: Path, classes: tuple[str, ...],
                 transform: Callable) -> None:
        index = {c: i for i, c in enumerate(classes)}
        self.files = [root / r.relpath for r in rows]
        self.targets = [index[r.label] for r in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return read_image(self.files[i], self.transform), self.targets[i]


def train_transform(net: Network, cfg: Finetune) -> Callable:
    """Random resized crop and horizontal flip, then the model's own normalization."""
    from timm.data import create_transform

    dc = net.backbone.data_config
    return create_transform(dc["input_size"], is_training=True, scale=cfg.crop_scale,
                            hflip=cfg.hflip, color_jitter=0.0, interpolation=dc["interpolation"],
                            mean=dc["mean"], std=dc["std"], re_prob=0.0)


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Every source of randomness of one epoch, from (seed, epoch) alone."""
    s = seed * 100_003 + epoch
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def _loader(ds: Images, cfg: Finetune, device: torch.device, shuffle: bool,
            generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    workers = resolve_workers(cfg.num_workers, device, most=4)
    return torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=False,
    )


def train_epoch(net: Network, loader, opt: torch.optim.Optimizer, sched, cfg: Finetune,
                device: torch.device, label: str) -> float:
    """One pass over the train split; returns the mean training loss."""
    train_mode(net, cfg.bn)
    # the loss is summed on the device: reading it each step would wait for the GPU
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    progress = Progress(label, len(loader.dataset))
    try:
        for x, y in loader:
            x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(device, cfg.precision):
                loss = F.cross_entropy(net.model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().double() * len(y)
            n += len(y)
            progress.advance(len(y))
    finally:
        progress.close()
    return float(total) / max(n, 1)


@torch.inference_mode()
def logits(net: Network, loader, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """The network's class scores for every image of the loader (eval mode)."""
    net.model.eval()
    out = []
    for x, _ in loader:
        x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
        with autocast(device, precision):
            out.append(net.model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, len(net.classes)))


def val_scores(net: Network, loader, device: torch.device,
               precision: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the val split."""
    z = torch.from_numpy(logits(net, loader, device, precision))
    y = torch.as_tensor(loader.dataset.targets)
    return float((z.argmax(1) == y).float().mean()), float(F.cross_entropy(z, y))


def improves(acc: float, loss: float, best_acc: float, best_loss: float,
             min_delta: float = 1e-4) -> bool:
    """Higher val accuracy, or the same with a val loss lower by min_delta: on a small val
    split the accuracy ties often (a few dozen images), and the loss tells epochs apart."""
    return acc > best_acc or (acc == best_acc and loss < best_loss - min_delta)


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base rates, then cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(net: Network, cfg: Finetune) -> torch.optim.Optimizer:
    groups = param_groups(net, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _optimizer_and_schedule(net: Network, cfg: Finetune, steps_per_epoch: int):
    """A fresh optimizer and its warm-up + cosine schedule over the whole run."""
    opt = make_optimizer(net, cfg)
    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))


# ---------------------------------------------------------------- the probe as a start


def probe_for_init(params: Params, train_rows: list[Row]) -> LinearHead:
    """The head's start: a logistic probe on the store's pooled codes of the train split only,
    at the C the sweep chose for pooled (train.C_grid on val).

    Not the saved probe, which is refit on train + val: a head that has seen the val images
    scores them near 1.0 from step 0, and val could no longer tell epochs apart."""
    from tasks.backbones import POOLED
    from tasks.train import make_probe, to_head

    paths = params.base.paths
    store = current_store(paths.features)
    with FeatureStore(store) as s:
        if POOLED not in s.layers:
            raise TlflowError("finetune.init_head: probe needs pooled codes in the store "
                              "(add pooled to extract.layers) or init_head: random")
        x = s.read(POOLED, [r.sha256 for r in train_rows])
    table = json.loads(paths.probe_metrics.read_text()).get("layers", [])
    C = next((r["C"] for r in table if r["layer"] == POOLED), 1.0)
    cfg = params.train.model_copy(update={"classifier": "logistic", "C_grid": (C,),
                                          "normalize": "standardize"})
    probe = make_probe(C, cfg, params.base.seed)
    probe.fit(x, [r.label for r in train_rows])
    print(f"finetune: the head starts from a probe on the train split's {POOLED} codes "
          f"(C={C:g})", flush=True)
    return to_head(probe, {"layer": POOLED, "extractor_id": store.stem})


# ---------------------------------------------------------------- the shell


def _fingerprint(params: Params, cfg: Finetune, manifest: Path, probe: list[Path]) -> str:
    """What a checkpoint must share with this run to be resumed by it."""
    ext = params.extract
    blob = json.dumps({
        "finetune": cfg.model_dump(mode="json"), "seed": params.base.seed,
        "backbone": ext.backbone, "weights": ext.weights, "image_size": ext.image_size,
        "manifest": sha256_file(manifest),
        "code": [sha256_file(Path(f)) for f in (checkpoint.__file__, network.__file__, __file__)],
        "skipped": sorted(bad_images(params.base.paths.extract_report)),
        "probe": [sha256_file(p) for p in probe if p.is_file()],
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


def run_phase(net: Network, phase: Phase, train_ds: Images, val_loader, seed: int,
              device: torch.device, curve_path: Path, curve_before: list[dict]) -> dict:
    """Train until epochs or patience run out, resuming a matching checkpoint; the returned
    state names the best epoch, whose weights are loaded into the network at the end."""
    from tasks.finetune import write_curve

    cfg, ckpt = phase.cfg, phase.ckpt
    freeze(net, cfg)
    steps = math.ceil(len(train_ds) / cfg.batch_size)
    opt, sched = _optimizer_and_schedule(net, cfg, steps)
    state = checkpoint.load_state(ckpt)
    if state is not None and state.get("fingerprint") != phase.fingerprint:
        state = None
    if state is not None:
        initial = {k: v.clone() for k, v in net.model.state_dict().items()}
        try:
            checkpoint.restore(ckpt, state, net.model, opt, sched)
            print(f"finetune: resuming after epoch {state['epoch']} from {ckpt}", flush=True)
        except Exception as err:  # a damaged or foreign checkpoint: never fatal, start afresh
            print(f"finetune: {ckpt} unusable ({type(err).__name__}: {err}); starting afresh",
                  flush=True)
            net.model.load_state_dict(initial)
            opt, sched = _optimizer_and_schedule(net, cfg, steps)
            state = None
        del initial
    if state is None:
        for old in (ckpt.glob("*.safetensors") if ckpt.is_dir() else ()):
            old.unlink()
        ckpt.mkdir(parents=True, exist_ok=True)
        state = {"epoch": 0, **_FRESH, "curve": []}
    trained = sum(p.numel() for p in net.model.parameters() if p.requires_grad)
    print(f"finetune: {cfg.trainable} ({trained:,} parameters train) on {len(train_ds)} "
          f"images, {device}, up to {cfg.epochs} epochs", flush=True)

    epoch = state["epoch"]
    while epoch < cfg.epochs and not state["stopped_early"]:
        epoch += 1
        t0 = time.perf_counter()
        gen = _seed_epoch(seed + 7 * phase.first_epoch, epoch)
        loss = train_epoch(net, _loader(train_ds, cfg, device, True, gen), opt, sched, cfg,
                           device, f"finetune epoch {epoch}")
        acc, val_loss = val_scores(net, val_loader, device, cfg.precision)
        state["curve"].append({"epoch": phase.first_epoch + epoch - 1,
                               "train_loss": round(loss, 6), "val_accuracy": round(acc, 6)})
        better = improves(acc, val_loss, state["best_accuracy"], state["best_loss"])
        if better:
            state["best_file"] = f"best-{epoch:04d}.safetensors"
            checkpoint.save_weights(ckpt / state["best_file"], net.model)
            state.update(best_accuracy=acc, best_loss=val_loss, best_epoch=epoch)
        state["stopped_early"] = epoch - state["best_epoch"] >= cfg.patience
        checkpoint.save(ckpt, epoch, net.model, opt, sched,
                        {**{k: state[k] for k in _FRESH}, "fingerprint": phase.fingerprint})
        write_curve(curve_path, curve_before + state["curve"])
        print(f"finetune: epoch {epoch}/{cfg.epochs} ({cfg.trainable}): train loss "
              f"{loss:.4f}, val accuracy {acc:.4f}{' (best)' if better else ''}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    if state["stopped_early"]:
        print(f"finetune: stopped early: no better val score for {cfg.patience} epochs",
              flush=True)
    checkpoint.load_weights(ckpt / state["best_file"], net.model)
    state["epochs_run"] = epoch
    return state


def fine_tune(params: Params, cfg: Finetune | None = None, then_all: bool = False) -> dict:
    """Fine-tune (cfg, default params.finetune), resuming matching checkpoints; with then_all,
    a second phase trains everything from the first's best weights, kept only if val
    improves. Saves the best-on-val network, its sidecar and the learning curve."""
    from tasks.finetune import write_curve

    cfg = cfg or params.finetune
    paths, seed = params.base.paths, params.base.seed
    rows = usable(read_manifest(paths.manifest), paths.extract_report)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"]
    if not val_rows:
        raise TlflowError("finetune: the val split is empty; early stopping and the best "
                          "epoch need one (set ingest.val_fraction above 0)")
    classes = tuple(sorted({r.label for r in train_rows + val_rows}))  # as the probe's
    image_size = cfg.image_size or params.extract.image_size
    device = resolve_device(cfg.device, "finetune.device")

    net = build(params.extract.backbone, params.extract.weights, image_size, seed, classes)
    if cfg.init_head == "probe":
        init_from_probe(net, probe_for_init(params, train_rows))
    net.model.to(device, memory_format=torch.channels_last)
    train_ds = Images(train_rows, paths.images, classes, train_transform(net, cfg))
    val_loader = _loader(Images(val_rows, paths.images, classes, net.backbone.transform()),
                         cfg, device, False)
    fingerprint = _fingerprint(params, cfg, paths.manifest,
                               [paths.probe_metrics] if cfg.init_head == "probe" else [])
    ckpt = paths.finetune_checkpoints
    first = run_phase(net, Phase(cfg, ckpt, fingerprint), train_ds, val_loader, seed, device,
                      paths.finetune_curve, [])
    final, curve, phases = first, first["curve"], [cfg.trainable]
    if then_all:
        every = cfg.model_copy(update={"trainable": "all"})
        print(f"finetune: then all layers, from the best {cfg.trainable} weights", flush=True)
        second = run_phase(net, Phase(every, ckpt / "all", f"{fingerprint}+all",
                                      first["epochs_run"] + 1),
                           train_ds, val_loader, seed, device, paths.finetune_curve, curve)
        curve = curve + second["curve"]
        if improves(second["best_accuracy"], second["best_loss"], first["best_accuracy"],
                    first["best_loss"]):
            final, phases = second, [cfg.trainable, "all"]
        else:
            print("finetune: all layers did not improve val; keeping the first phase",
                  flush=True)
            checkpoint.load_weights(ckpt / first["best_file"], net.model)
    meta = {"trainable": "+".join(phases), "n_blocks": cfg.n_blocks,
            "init_head": cfg.init_head, "image_size": image_size,
            "best_epoch": final["curve"][final["best_epoch"] - 1]["epoch"],
            "val_accuracy": final["best_accuracy"], "epochs_run": len(curve),
            "stopped_early": final["stopped_early"]}
    net.model.to("cpu", memory_format=torch.contiguous_format)
    save_network(net, paths.finetuned, meta)
    write_curve(paths.finetune_curve, curve)
    shutil.rmtree(ckpt, ignore_errors=True)  # done: a rerun (forced, or new code) starts afresh
    print(f"finetune: best epoch {meta['best_epoch']}, val accuracy "
          f"{meta['val_accuracy']:.4f} -> {paths.finetuned}", flush=True)
    return meta


def finetuned_probabilities(params: Params, net: Network, files: list[Path]) -> np.ndarray:
    """Softmax probabilities of the fine-tuned network for image files (finetune.device)."""
    from scipy.special import softmax

    device = resolve_device(params.finetune.device, "finetune.device")
    ds = Images([Row(str(f), "", net.classes[0], "") for f in files], Path(), net.classes,
                net.backbone.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=params.finetune.batch_size)
    net.model.to(device, memory_format=torch.channels_last)
    return softmax(logits(net, loader, device), axis=1)
