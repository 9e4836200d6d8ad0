"""Turning images into CNN codes: the extractor's identity, the loader, the batched forward
pass, and the filling of a feature store. Used by extract (the stage) and predict."""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlflow.tasks.lib.core.device import autocast, resolve_workers, set_cpu_threads
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.params import Extract
from tlflow.tasks.lib.core.progress import Progress
from tlflow.tasks.lib.data.decode import DECODING, read_image
from tlflow.tasks.lib.data.manifest import Row
from tlflow.tasks.lib.features.backbones import Backbone
from tlflow.tasks.lib.features.codes import CodeExtractor
from tlflow.tasks.lib.features.runtime import (
    ORT,
    OrtCodes,
    code_model,
    code_precision,
    effective_runtime,
)
from tlflow.tasks.lib.features.store import FeatureStore

POOLING = "avg"


def describe_extractor(identity: dict[str, Any], cfg: Extract,
                       device: torch.device) -> dict[str, Any]:
    """The canonical description hashed into the extractor id: backbone, weights,
    preprocessing, decoding rules and policy (`extract.decode`, named only when scaled),
    layers, pooling, storage dtype, the precision the codes are computed in (bf16 codes
    differ from fp32 ones) and, when it is ONNX Runtime, the runtime (named only then:
    torch's ids are those from before it). Not the device itself, nor the batch size: fp32
    codes agree across devices to float tolerance. Raises TlflowError for a runtime that
    cannot run here (runtime.effective_runtime)."""
    described = {**identity, "layers": sorted(cfg.layers), "pooling": POOLING,
                 "dtype": cfg.dtype, "decoding": DECODING,
                 "precision": code_precision(cfg, device)}
    if cfg.decode != "full":  # absent for full: stores and heads from before it are reused
        described["decode"] = cfg.decode
    if effective_runtime(cfg, device) == ORT:
        described["runtime"] = ORT
    return described


def decode_side(backbone: Backbone, cfg: Extract) -> int | None:
    """The shorter side a scaled JPEG decode must keep (images.decode's `min_side`): the
    eval transform's resize side with `extract.decode: scaled`, None (every pixel) with
    `full`."""
    return backbone.resize_side if cfg.decode == "scaled" else None


def missing_images(rows: list[Row], have: set[str]) -> list[Row]:
    """One row per image hash the store lacks (duplicates by content are computed once)."""
    todo: dict[str, Row] = {}
    for r in rows:
        if r.sha256 not in have and r.sha256 not in todo:
            todo[r.sha256] = r
    return list(todo.values())


class ImageFiles(torch.utils.data.Dataset):
    """(index, tensor or None, error or None) per file: a bad file never stops the loader."""

    def __init__(self, files: list[Path], transform: Callable,
                 min_side: int | None = None) -> None:
        self.files, self.transform, self.min_side = files, transform, min_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, read_image(self.files[i], self.transform, self.min_side), None
        except TlflowError as err:
            return i, None, str(err)


@dataclass
class Batch:
    """The readable images of one loader batch, and the errors of the others."""

    indices: list[int]
    images: torch.Tensor | None
    errors: list[tuple[int, str]]


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    return Batch(
        indices=[i for i, _ in good],
        images=torch.stack([x for _, x in good]) if good else None,
        errors=[(i, e) for i, _, e in items if e is not None],
    )


def encode(model: CodeExtractor | OrtCodes, x: torch.Tensor, device: torch.device,
           precision: str) -> dict[str, np.ndarray]:
    """Codes of one batch x (N, 3, H, W): {layer: (N, D) float32 numpy}, from one forward pass
    of the CodeExtractor (in ONNX Runtime: `model` an OrtCodes, fp32); on CUDA out-of-memory,
    halve the batch and retry."""
    if isinstance(model, OrtCodes):
        return {k: v.numpy() for k, v in model(x).items()}
    try:
        with torch.inference_mode(), autocast(device, precision):
            x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
            return {k: v.float().cpu().numpy() for k, v in model(x).items()}
    except torch.cuda.OutOfMemoryError:
        if len(x) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(x) // 2
        parts = [encode(model, p, device, precision) for p in (x[:half], x[half:])]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def encode_batch(model: CodeExtractor | OrtCodes, images: torch.Tensor, cfg: Extract,
                 device: torch.device) -> dict[str, np.ndarray]:
    """Codes of one loader batch (n, 3, H, W), n <= batch_size: {layer: (n, D)} in the
    store's dtype. A short batch (the last one, one with unreadable images) is padded with
    zero images to `batch_size` and the padding's codes dropped: oneDNN chooses its
    convolution kernels by the input's shape and the thread count, and their sums differ in
    the last bits, so every forward pass has one shape and an image's codes do not depend
    on which images share its batch (local and sharded executors, a resumed run)."""
    n = len(images)
    if n < cfg.batch_size:
        pad = images.new_zeros((cfg.batch_size - n, *images.shape[1:]))
        images = torch.cat([images, pad])
    codes = encode(model, images, device, cfg.precision)
    return {k: v[:n].astype(cfg.dtype) for k, v in codes.items()}


def fill(store: FeatureStore, model: CodeExtractor | OrtCodes, todo: list[Row],
         loader: Iterator[Batch], cfg: Extract, device: torch.device) -> list[dict[str, str]]:
    """Compute and commit the codes of `todo` batch by batch; return the unreadable images."""
    bad: list[dict[str, str]] = []
    progress = Progress("extract", len(todo))
    try:
        for batch in loader:
            for i, err in batch.errors:
                if cfg.on_bad_image == "fail":
                    raise TlflowError(err)
                print(f"extract: skipped {err}", flush=True)
                bad.append({"relpath": todo[i].relpath, "sha256": todo[i].sha256, "reason": err})
            if batch.images is not None:
                store.append([todo[i].sha256 for i in batch.indices],
                             encode_batch(model, batch.images, cfg, device))
            progress.advance(len(batch.indices) + len(batch.errors))
    finally:
        close(loader)
        progress.close()
    return bad


def decode_threads(most: int = 8) -> int:
    """Decoding threads on a CPU: one per core, at most `most`. Measured on 2 cores with the
    forward pass in ONNX Runtime (bench/extract.py): 2 threads against 1 took the 40
    12-megapixel JPEGs from 1.33 to 1.01 s and the 396 photos from 3.89 to 3.76 s; 3 did no
    better. The threads sleep while Pillow or the forward pass has the cores."""
    return max(1, min(most, os.cpu_count() or 1))


def decoded_in_threads(images: ImageFiles, batch_size: int, threads: int,
                       depth: int = 2) -> Iterator[Batch]:
    """The batches of `images` in order, each image decoded by a pool of `threads` threads
    (Pillow releases the GIL while it decodes and resizes), up to `depth` batches ahead of
    the consumer, so that decoding overlaps the forward pass and itself. Leaving the loop
    early (an error, an interrupt) cancels what has not started and joins the threads."""
    starts = iter(range(0, len(images), batch_size))
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tlflow-decode")

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            end = min(start + batch_size, len(images))
            pending.append([pool.submit(images.__getitem__, i) for i in range(start, end)])

    try:
        for _ in range(depth):
            submit()
        while pending:
            batch = collate([f.result() for f in pending.popleft()])
            submit()
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def close(batches: Iterable[Batch]) -> None:
    """Stop a loader's decoding threads now (`decoded_in_threads`), not when it is
    collected: after an error or an interrupt its frame lives on in the traceback."""
    getattr(batches, "close", lambda: None)()


def make_loader(files: list[Path], backbone: Backbone, cfg: Extract,
                device: torch.device) -> Iterable[Batch]:
    """Batches of decoded images in file order (extraction is deterministic: no shuffling):
    from decoder processes (`extract.num_workers`, CUDA's default), else, on a CPU with
    `num_workers: null`, from a pool of decoding threads beside the forward pass
    (`decoded_in_threads`, `decode_threads`; `0`: decoded in turn with it)."""
    workers = resolve_workers(cfg.num_workers, device)
    set_cpu_threads(device, workers)  # decoders and the forward pass share the cores
    images = ImageFiles(files, backbone.transform(), decode_side(backbone, cfg))
    if workers == 0 and cfg.num_workers is None:  # a CPU: a thread per core decodes
        return decoded_in_threads(images, cfg.batch_size, decode_threads())
    loader = torch.utils.data.DataLoader(
        images, batch_size=cfg.batch_size,
        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    return loader


def compute_codes(files: list[Path], backbone: Backbone, layer: str, cfg: Extract,
                  device: torch.device) -> list[np.ndarray]:
    """Codes of one layer for image files, in order; an unreadable file is an error."""
    set_cpu_threads(device, 0)
    model = code_model(CodeExtractor(backbone, (layer,)), backbone.input_size, cfg, device)
    transform, side = backbone.transform(), decode_side(backbone, cfg)
    out: list[np.ndarray] = []
    for start in range(0, len(files), cfg.batch_size):
        x = torch.stack([read_image(f, transform, side)
                         for f in files[start:start + cfg.batch_size]])
        out.extend(encode(model, x, device, cfg.precision)[layer])
    return out
