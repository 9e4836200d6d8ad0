"""Turning images into CNN codes: the extractor's identity, the loader, the batched forward
pass, and the filling of a feature store. Used by extract (the stage) and predict."""

from __future__ import annotations

import contextlib
import queue
import threading
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


_END = object()


def in_background(batches: Iterable[Batch], depth: int = 2) -> Iterator[Batch]:
    """The batches of `batches`, made by one background thread up to `depth` ahead, so that
    on a CPU decoding overlaps the forward pass (Pillow releases the GIL while it decodes and
    resizes, torch while it computes). Order is kept; an error in the thread is raised here;
    leaving the loop early (an error, an interrupt) stops the thread at its next batch."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=produce, name="tlflow-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # joined, never left running into the interpreter's shutdown: at most a batch
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        thread.join()


def close(batches: Iterable[Batch]) -> None:
    """Stop a loader's background thread now (`in_background`), not when it is collected:
    after an error or an interrupt its frame lives on in the traceback."""
    getattr(batches, "close", lambda: None)()


def make_loader(files: list[Path], backbone: Backbone, cfg: Extract,
                device: torch.device) -> Iterable[Batch]:
    """Batches of decoded images in file order (extraction is deterministic: no shuffling):
    from decoder processes (`extract.num_workers`, CUDA's default), else, on a CPU with
    `num_workers: null`, from one background thread beside the forward pass (`in_background`;
    `0`: decoded in turn with it)."""
    workers = resolve_workers(cfg.num_workers, device)
    set_cpu_threads(device, workers)  # decoders and the forward pass share the cores
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, backbone.transform(), decode_side(backbone, cfg)),
        batch_size=cfg.batch_size,
        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    return in_background(loader) if workers == 0 and cfg.num_workers is None else loader


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
