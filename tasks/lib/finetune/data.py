"""Fine-tuning's data: the images as a torch Dataset, their augmentation, the epoch's loaders.

The dataset is handed its items and a `read` function by the stage shell (tasks/finetune.py
passes images.read_image, the one decoding function of every stage); it never opens a file
itself, so a test can feed it from memory. Every random draw of an epoch comes from (seed,
epoch): image i's crop and flip from a random.Random of its own, the shuffling from a torch
Generator, dropout from torch's default generator reseeded per epoch and rank. A killed run
that resumes at epoch e therefore draws what an uninterrupted one draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from tlflow.tasks.lib.core.device import resolve_workers, set_cpu_threads
from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.finetune.network import Network
from tlflow.tasks.lib.scale import ddp

_RANK_STRIDE = 1_000_003  # dropout seeds of rank r: the epoch's seed + r * this

# read(item, transform) -> tensor: decode one item (an image file's path, for the stage)
Reader = Callable[[Any, Callable[[Image.Image], torch.Tensor]], torch.Tensor]


def class_indices(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Each label's index in `classes` (KeyError for a label outside them)."""
    index = {c: i for i, c in enumerate(classes)}
    return [index[label] for label in labels]


class Images(torch.utils.data.Dataset):
    """(image tensor, class index) for `items` (image files, as the shell names them), each
    decoded by `read(item, transform)`.

    With `augment`, image i of epoch e is augmented by a random.Random of its own, seeded
    from (seed, e, i): the same crops and flips whatever the loader's workers, threads or
    order, and no draw from a process-global generator another library may share.
    """

    def __init__(self, items: Sequence[Any], targets: Sequence[int], read: Reader,
                 transform: Callable, augment: Augment | None = None, seed: int = 0) -> None:
        if len(items) != len(targets):
            raise ValueError(f"{len(items)} items but {len(targets)} targets")
        self.items, self.targets = list(items), list(targets)
        self.read, self.transform, self.augment, self.seed, self.epoch = (
            read, transform, augment, seed, 0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.augment is None:
            return self.read(self.items[i], self.transform), self.targets[i]
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        return self.read(self.items[i], lambda img: self.augment(img, rng)), self.targets[i]


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


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The shuffling of one epoch, from (seed, epoch) alone. torch's default generator is
    reseeded too: dropout and drop-path draw from it (torch offers them no generator), and
    only torch ops draw from it, in this thread, during the epoch; each rank draws its own."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s + _RANK_STRIDE * rank)
    return torch.Generator().manual_seed(s)


def loader(ds: torch.utils.data.Dataset, cfg: Finetune, device: torch.device, shuffle: bool,
           generator: torch.Generator | None = None,
           sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    """Batches of cfg.batch_size, on finetune.num_workers workers (at most 4; none on CPU
    when resolve_workers says so), pinned memory on CUDA, the last batch kept."""
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
    r = ddp.current()
    generator = epoch_generator(seed, epoch, r.rank)
    if not r.distributed:
        return loader(ds, cfg, device, True, generator)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=r.world, rank=r.rank,
                                                  shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return loader(ds, cfg, device, False, sampler=sampler)
