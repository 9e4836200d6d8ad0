"""The served model as one ONNX graph: a preprocessed image batch in, class scores out.

Input `images`: float32 (N, 3, H, W), N dynamic, H = W = the model's input size, already
decoded, resized, center-cropped and normalized as the sidecar's `preprocess` says (timm's
eval transform of the backbone's data config). Output: `probabilities` (N, K), or for a
linear SVM head, which has none, its `decision` values (N, K), as predict prints them.

- probe: the backbone's codes of the head's layer (CodeExtractor: the same modules, the same
  feature APIs as extract and predict), the head's standardization (l2 normalization first
  where the head has it), its linear layer, then softmax (or scikit-learn's normalized
  one-vs-rest sigmoids, as LinearHead.predict_proba computes them).
- finetuned: the network as tasks/lib/finetune/network.py rebuilds it, then softmax.

Always fp32, whatever precision the head's codes were computed in (the sidecar says when
predict computes in another). Exported with torch.onnx.export(dynamo=True) (the torch.export
based exporter, torch's default since 2.9; it needs onnx and onnxscript), the batch dimension
a torch.export.Dim; the written file is checked against the torch module in ONNX Runtime
before its sidecar lands. The three packages are tlflow's dependencies (extract.runtime).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path, sha256_file, write_json
from tlflow.tasks.lib.features.backbones import Backbone
from tlflow.tasks.lib.features.codes import CodeExtractor
from tlflow.tasks.lib.features.runtime import (
    OPSET,
    TOLERANCE,
    check_batch,
    ort_session,
    to_onnx,
)
from tlflow.tasks.lib.models.exported import FORMAT, require_onnx
from tlflow.tasks.lib.probe.head import LinearHead

INPUT = "images"


class ProbeGraph(nn.Module):
    """backbone -> code of `layer` -> the head's scores. forward: (N, 3, H, W) -> (N, K)."""

    def __init__(self, backbone: Backbone, head: LinearHead) -> None:
        super().__init__()
        self.layer = head.meta.layer
        self.extractor = CodeExtractor(backbone, (self.layer,))
        self.l2 = head.meta.normalize == "l2"
        self.scores = head.meta.scores
        for name in ("weight", "bias", "mean", "scale"):
            self.register_buffer(name, torch.as_tensor(np.asarray(getattr(head, name)),
                                                       dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.extractor(x)[self.layer]
        if self.l2:
            code = code / code.norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = ((code - self.mean) / self.scale) @ self.weight.T + self.bias
        if self.scores == "decision":
            return z
        if self.scores == "ovr_probability":
            p = torch.sigmoid(z)
            return p / p.sum(dim=1, keepdim=True)
        return torch.softmax(z, dim=1)


class SoftmaxGraph(nn.Module):
    """A classifier network followed by softmax: (N, 3, H, W) -> (N, K) probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


def preprocess(backbone: Backbone, decode: str) -> dict[str, Any]:
    """What turns an image file into one row of `images`: decode (tasks/lib/data/decode.py: EXIF
    orientation applied, RGB; `scaled`: JPEGs decoded at a reduced scale that keeps at least
    resize_side px), resize the shorter side to resize_side, center crop to input_size,
    scale to [0, 1], subtract mean, divide by std (per RGB channel); `data_config` is timm's,
    for timm.data.create_transform(**data_config)."""
    dc = backbone.data_config
    return {
        "input_size": [int(v) for v in dc["input_size"]],
        "resize_side": backbone.resize_side,
        "crop": dc.get("crop_mode", "center"),
        "crop_pct": dc.get("crop_pct"),
        "interpolation": dc["interpolation"],
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
        "channels": "RGB", "layout": "NCHW", "scale": "pixel / 255, then (x - mean) / std",
        "decode": decode,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dc.items()},
    }


@dataclass(frozen=True)
class Exported:
    """The written graph, its sidecar, and what its writing measured."""

    onnx: Path
    sidecar: Path
    seconds: float  # the export alone (tracing, translation, optimization, saving)
    max_diff: float  # max |ORT - torch| over the check batch's scores
    size: int  # bytes of the .onnx


def run_onnx(session: Any, images: np.ndarray) -> np.ndarray:
    """The graph's scores (N, K) for a preprocessed batch (N, 3, H, W) float32."""
    return session.run(None, {INPUT: np.ascontiguousarray(images, dtype=np.float32)})[0]


def export(module: nn.Module, size: int, output: str, dest: Path,
           meta: dict[str, Any]) -> Exported:
    """Write `module` (fp32, eval, CPU) as dest (.onnx) with a dynamic batch, check it in ONNX
    Runtime against torch on a fixed batch, then write the sidecar dest.with_suffix(".json"):
    `meta` plus the graph's input, output, sha256, the check and the versions. Raises
    TlflowError when the optional packages are missing or ORT disagrees with torch."""
    require_onnx()
    import onnx
    import onnxruntime

    module = module.float().eval().cpu()
    start = time.perf_counter()
    program = to_onnx(module, check_batch(size, 2), INPUT, [output])
    with atomic_path(dest) as tmp:
        program.save(str(tmp), external_data=False)
    seconds = time.perf_counter() - start
    check = check_batch(size)
    with torch.inference_mode():
        want = module(check).numpy()
    got = run_onnx(ort_session(dest), check.numpy())
    diff = float(np.abs(got - want).max())
    if not diff <= TOLERANCE * max(1.0, float(np.abs(want).max())):
        dest.unlink()
        raise TlflowError(f"export: ONNX Runtime differs from torch by {diff:.3g} on the check "
                          f"batch (tolerance {TOLERANCE:g}); the graph was not kept")
    sidecar = dest.with_suffix(".json")
    write_json(sidecar, {
        **meta, "format": FORMAT, "file": dest.name, "sha256": sha256_file(dest),
        "input": {"name": INPUT, "dtype": "float32", "shape": ["batch", 3, size, size]},
        "output": {"name": output, "dtype": "float32",
                   "shape": ["batch", len(meta["classes"])]},
        "precision": "fp32", "opset": OPSET,
        "check": {"images": int(check.shape[0]), "max_abs_diff_ort_vs_torch": diff},
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "dynamo": True,
                     "python": platform.python_version()},
    })
    return Exported(dest, sidecar, seconds, diff, dest.stat().st_size)


def read_batch(files: list[Path], prep: dict[str, Any]) -> np.ndarray:
    """The graph's input (N, 3, H, W) float32 for image files, preprocessed as a sidecar's
    `preprocess` says: tlflow's decoding (tasks/lib/data/decode.py), then timm's eval transform
    of its data_config. Raises TlflowError naming an unreadable file."""
    from timm.data import create_transform

    from tlflow.tasks.lib.data.decode import read_image

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in prep["data_config"].items()}
    transform = create_transform(**cfg, is_training=False)
    side = prep["resize_side"] if prep["decode"] == "scaled" else None
    return torch.stack([read_image(f, transform, side) for f in files]).numpy()
