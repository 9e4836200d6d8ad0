"""Extract: turn every image of the manifest into CNN codes, cached in the HDF5 feature store.

Only the image hashes the store lacks are computed, every requested layer in one forward pass,
and rows are committed batch by batch: a killed run resumes from its last committed batch.
`<features>/current.json` names the store the current params select, for the stages downstream;
the extract report lists how many codes were computed and which images could not be read.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks.backbones import Backbone, CodeExtractor, create_backbone
from tasks.errors import TlflowError
from tasks.featurestore import POINTER, FeatureStore, extractor_id, writer_lock
from tasks.ingest import Row, read_manifest
from tasks.io import write_json
from tasks.params import Extract, Params
from tasks.progress import Progress

POOLING = "avg"
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str, key: str = "extract.device") -> torch.device:
    """`auto` is the first CUDA GPU when present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TlflowError(f"{key}: {spec!r} asked for, but no CUDA GPU is available")
    return torch.device(spec)


def resolve_workers(num_workers: int | None, device: torch.device, most: int = 8) -> int:
    """Decoder processes: on CUDA they overlap the GPU; on CPU they would take its cores."""
    if num_workers is not None:
        return num_workers
    return min(most, max(1, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 or fp16); the CPU computes in fp32."""
    if device.type == "cuda" and precision in _AUTOCAST:
        return torch.autocast("cuda", dtype=_AUTOCAST[precision])
    return contextlib.nullcontext()


def describe_extractor(identity: dict[str, Any], cfg: Extract) -> dict[str, Any]:
    """The canonical description hashed into the extractor id (no batch size or device)."""
    return {**identity, "layers": sorted(cfg.layers), "pooling": POOLING, "dtype": cfg.dtype}


def missing_images(rows: list[Row], have: set[str]) -> list[Row]:
    """One row per image hash the store lacks (duplicates by content are computed once)."""
    todo: dict[str, Row] = {}
    for r in rows:
        if r.sha256 not in have and r.sha256 not in todo:
            todo[r.sha256] = r
    return list(todo.values())


# ---------------------------------------------------------------- decoding


def read_image(path: Path, transform: Callable) -> torch.Tensor:
    """Decode and preprocess one file; any failure is a TlflowError naming file and reason.

    Pillow's decompression-bomb warning (a header declaring a huge size) counts as a failure.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return transform(img.convert("RGB"))
    except Exception as err:
        raise TlflowError(f"{path}: cannot read image: {_reason(path, err)}") from None


def _reason(path: Path, err: Exception) -> str:
    if path.is_file() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb ({err})"
    return f"{type(err).__name__}: {err}"


class ImageFiles(torch.utils.data.Dataset):
    """(index, tensor or None, error or None) per file: a bad file never stops the loader."""

    def __init__(self, files: list[Path], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, read_image(self.files[i], self.transform), None
        except TlflowError as err:
            return i, None, str(err)


@dataclass
class Batch:
    """The readable images of one loader batch, and the errors of the others."""

    indices: list[int]
    images: torch.Tensor | None
    errors: list[tuple[int, str]]


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    return Batch(
        indices=[i for i, _ in good],
        images=torch.stack([x for _, x in good]) if good else None,
        errors=[(i, e) for i, _, e in items if e is not None],
    )


# ---------------------------------------------------------------- the core


def encode(model: CodeExtractor, x: torch.Tensor, device: torch.device,
           precision: str) -> dict[str, np.ndarray]:
    """Codes of one batch (float32 numpy); on CUDA out-of-memory, halve the batch and retry."""
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


def fill(store: FeatureStore, model: CodeExtractor, todo: list[Row], loader: Iterator[Batch],
         cfg: Extract, device: torch.device) -> list[dict[str, str]]:
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
                codes = encode(model, batch.images, device, cfg.precision)
                store.append([todo[i].sha256 for i in batch.indices],
                             {k: v.astype(cfg.dtype) for k, v in codes.items()})
            progress.advance(len(batch.indices) + len(batch.errors))
    finally:
        progress.close()
    return bad


# ---------------------------------------------------------------- the shell


def store_path(features_dir: Path, ext_id: str) -> Path:
    """Where the codes of one extractor live."""
    return features_dir / f"{ext_id}.h5"


def _loader(todo: list[Row], images: Path, backbone: Backbone, cfg: Extract,
            device: torch.device) -> torch.utils.data.DataLoader:
    workers = resolve_workers(cfg.num_workers, device)
    if device.type == "cpu":  # decoders and the forward pass share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    return torch.utils.data.DataLoader(
        ImageFiles([images / r.relpath for r in todo], backbone.transform()),
        batch_size=cfg.batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )


def run(params: Params) -> Path:
    """Compute the codes the store lacks; point `current.json` at the store; write the report."""
    cfg, paths = params.extract, params.base.paths
    rows = read_manifest(paths.manifest)
    device = resolve_device(cfg.device)
    backbone = create_backbone(cfg.backbone, cfg.weights, cfg.image_size, params.base.seed)
    extractor = describe_extractor(backbone.identity(), cfg)
    ext_id = extractor_id(extractor)
    model = CodeExtractor(backbone, cfg.layers)
    dims = model.dims(backbone.data_config["input_size"][-1])
    path = store_path(paths.features, ext_id)
    with writer_lock(path, cfg.lock_timeout), \
            FeatureStore.create(path, extractor, dims, cfg.dtype) as store:
        todo = missing_images(rows, set(store.keys()))
        n_images = len({r.sha256 for r in rows})
        print(f"extract: {ext_id} ({backbone.name}) on {device}, {len(todo)} of {n_images} "
              "images to compute", flush=True)
        bad = []
        if todo:
            model = model.to(device, memory_format=torch.channels_last)
            bad = fill(store, model, todo, iter(_loader(todo, paths.images, backbone, cfg,
                                                        device)), cfg, device)
    # A function of (manifest, extractor) only, so a rerun that computes nothing changes nothing.
    write_json(paths.extract_report, {"extractor_id": ext_id, "images": n_images,
                                      "skipped": len(bad), "bad_images": bad})
    print(f"extract: {len(todo) - len(bad)} computed, {n_images - len(todo)} cached, "
          f"{len(bad)} skipped -> {path}", flush=True)
    write_json(paths.features / POINTER, {"extractor_id": ext_id, "store": path.name,
                                          "extractor": extractor})
    return path


# ---------------------------------------------------------------- maintenance


def gc(params: Params, dry_run: bool = False) -> list[tuple[Path, int, int]]:
    """Prune every store's rows that the manifest no longer references.

    Returns (store, rows kept, rows removed) per store; each store is rewritten under its
    writer lock and renamed into place, so a crash leaves the old file whole.
    """
    from tasks.featurestore import prune

    keep = {r.sha256 for r in read_manifest(params.base.paths.manifest)}
    out = []
    for path in sorted(params.base.paths.features.glob("*.h5")):
        with writer_lock(path, params.extract.lock_timeout):
            if dry_run:
                with FeatureStore(path) as store:
                    keys = store.keys()
                kept = sum(k in keep for k in keys)
                out.append((path, kept, len(keys) - kept))
            else:
                out.append((path, *prune(path, keep)))
    return out


def info(path: Path) -> dict[str, Any]:
    """What a store holds: extractor JSON, committed rows, layers and dims, size, versions."""
    with FeatureStore(path) as store:
        return {"store": str(path), "extractor_id": path.stem, "rows": store.n_committed,
                "layers": store.layers, "bytes": store.size_bytes(),
                "extractor": store.extractor, "versions": store.versions}
