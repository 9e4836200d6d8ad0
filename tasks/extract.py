"""Extract: turn every image of the manifest into CNN codes, cached in the HDF5 feature store.

Only the image hashes the store lacks are computed, every requested layer in one forward pass.
The store's name is the extractor id; `<features>/current.json` names the store the current
params select, for the stages downstream.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks.backbones import CodeExtractor, create_backbone
from tasks.errors import TlflowError
from tasks.featurestore import FeatureStore, extractor_id
from tasks.ingest import Row, read_manifest
from tasks.io import write_json
from tasks.params import Extract, Params

POINTER = "current.json"
POOLING = "avg"


def resolve_device(spec: str) -> torch.device:
    """`auto` is the first CUDA GPU when present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TlflowError(f"extract.device: {spec!r} asked for, but no CUDA GPU is available")
    return torch.device(spec)


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


class ImageFiles(torch.utils.data.Dataset):
    """Decode and preprocess image files; a file that cannot be read names itself."""

    def __init__(self, files: list[Path], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB"))
        except Exception as err:
            raise TlflowError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def encode_batches(
    model: CodeExtractor, batches: Iterator[torch.Tensor], device: torch.device
) -> Iterator[dict[str, np.ndarray]]:
    """The core: batches of images in, codes per layer out (float32, no gradients)."""
    fmt = torch.channels_last
    with torch.inference_mode():
        for x in batches:
            codes = model(x.to(device, memory_format=fmt, non_blocking=True))
            yield {k: v.cpu().numpy() for k, v in codes.items()}


class _Progress:
    """A rich bar on a terminal; plain periodic lines otherwise (they show in Prefect logs)."""

    def __init__(self, total: int, every_s: float = 10.0) -> None:
        self.total, self.done, self.every_s = total, 0, every_s
        self.t0 = self.last = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(*Progress.get_default_columns(), "{task.fields[rate]}")
            self._bar.start()
            self._task = self._bar.add_task("extract", total=total, rate="")

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{rate:.1f} img/s")
        elif now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            print(f"extract: {self.done}/{self.total} images, {rate:.1f} img/s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def store_path(features_dir: Path, ext_id: str) -> Path:
    """Where the codes of one extractor live."""
    return features_dir / f"{ext_id}.h5"


def current_store(features_dir: Path) -> Path:
    """The store the last extract run selected (read from the pointer file)."""
    import json

    pointer = features_dir / POINTER
    if not pointer.is_file():
        raise TlflowError(f"{pointer}: not found (run `tlflow stage extract` first)")
    return features_dir / json.loads(pointer.read_text())["store"]


def run(params: Params) -> Path:
    """Compute the codes the store lacks; point `current.json` at the store."""
    cfg, paths = params.extract, params.base.paths
    rows = read_manifest(paths.manifest)
    device = resolve_device(cfg.device)
    backbone = create_backbone(cfg.backbone, cfg.weights, cfg.image_size, params.base.seed)
    extractor = describe_extractor(backbone.identity(), cfg)
    ext_id = extractor_id(extractor)
    model = CodeExtractor(backbone, cfg.layers)
    dims = model.dims(backbone.data_config["input_size"][-1])
    path = store_path(paths.features, ext_id)
    with FeatureStore.create(path, extractor, dims, cfg.dtype) as store:
        todo = missing_images(rows, set(store.keys()))
        print(f"extract: {ext_id} ({backbone.name}), {len(todo)} of "
              f"{len({r.sha256 for r in rows})} images to compute", flush=True)
        if todo:
            _fill(store, model.to(device, memory_format=torch.channels_last), backbone,
                  todo, paths.images, cfg, device)
    write_json(paths.features / POINTER, {"extractor_id": ext_id, "store": path.name,
                                          "extractor": extractor})
    return path


def _fill(store: FeatureStore, model: CodeExtractor, backbone: Any, todo: list[Row],
          images: Path, cfg: Extract, device: torch.device) -> None:
    files = [images / r.relpath for r in todo]
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, backbone.transform()), batch_size=cfg.batch_size,
        pin_memory=device.type == "cuda",
    )
    progress, start = _Progress(len(todo)), 0
    try:
        for codes in encode_batches(model, iter(loader), device):
            n = len(next(iter(codes.values())))
            keys = [r.sha256 for r in todo[start : start + n]]
            store.append(keys, {k: v.astype(cfg.dtype) for k, v in codes.items()})
            start += n
            progress.advance(n)
    finally:
        progress.close()
