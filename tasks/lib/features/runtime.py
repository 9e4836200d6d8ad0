"""Where the forward pass that computes codes runs: torch (eager), or ONNX Runtime on a CPU.

`extract.runtime`:

- `auto` (the default): ONNX Runtime on a CPU when `extract.precision` is `auto`, torch
  elsewhere (a GPU; a precision asked for by name, so that `fp32` gives the codes of torch's
  eager fp32 pass bit for bit and `bf16` torch's autocast).
- `torch`: torch's eager forward pass (channels_last, inference mode, autocast).
- `onnxruntime`: the CodeExtractor exported to one ONNX graph (torch.onnx.export with the
  dynamo exporter, the codes of every layer as outputs) and run by ONNX Runtime's CPU
  execution provider, in fp32.

Why: on this project's 2-core CPU (AMD EPYC, AVX512-BF16, no AMX) EfficientNet-Lite0's codes
at batch 32 and 224 px came at 56 img/s in torch fp32, 127 in torch bf16 and 200-209 in ONNX
Runtime fp32, within 9e-6 of torch fp32 (bench/extract.py; README "Speed on a CPU"). ONNX
Runtime's CPU kernels (MLAS) fuse the depthwise convolutions, batch norms and activations
that torch's eager mode runs one by one. Its sums do not depend on the intra-op thread
count (checked at 1 and 2 threads), and extract pads every batch to one shape, so an image's
codes are the same whichever executor or shard computes them.

The graph is exported once per backbone, weights, layers and input size and kept in the
user's cache (`graph_cache`: $XDG_CACHE_HOME/tlflow/graphs, else ~/.cache/tlflow/graphs),
checked against torch on a fixed batch when it is made; where that folder cannot be written
(a read-only HOME) the graph is made in memory for the process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlflow.tasks.lib.core.device import effective_precision
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path
from tlflow.tasks.lib.core.params import Extract
from tlflow.tasks.lib.features.codes import CodeExtractor

ORT = "onnxruntime"
OPSET = 18  # the dynamo exporter's default opset in torch 2.9+
TOLERANCE = 1e-4  # ORT against torch on the check batch, relative to the largest value
_PACKAGES = ("onnxruntime", "onnx", "onnxscript")  # to run, and to export with dynamo


@functools.cache
def ort_installed() -> bool:
    """Whether ONNX Runtime and the dynamo exporter's packages are importable."""
    return all(importlib.util.find_spec(p) is not None for p in _PACKAGES)


def effective_runtime(cfg: Extract, device: torch.device) -> str:
    """`torch` or `onnxruntime`: what computes this extract config's codes on `device`.

    Raises TlflowError for `onnxruntime` asked on a GPU, with a precision other than fp32,
    or without its packages installed."""
    if cfg.runtime == "torch":
        return "torch"
    if cfg.runtime == ORT:
        if device.type != "cpu":
            raise TlflowError(f"extract.runtime: onnxruntime runs on the CPU; extract.device "
                              f"is {device} (use extract.runtime: auto or torch)")
        if cfg.precision == "bf16":
            raise TlflowError(f"extract.runtime: onnxruntime computes in fp32, not "
                              f"extract.precision {cfg.precision} (use extract.runtime: torch)")
        if not ort_installed():
            raise TlflowError("extract.runtime: onnxruntime needs the packages "
                              f"{', '.join(_PACKAGES)} (pip install {' '.join(_PACKAGES)})")
        return ORT
    ort = device.type == "cpu" and cfg.precision == "auto" and ort_installed()
    return ORT if ort else "torch"


def code_precision(cfg: Extract, device: torch.device) -> str:
    """The precision the codes are computed in: fp32 under ONNX Runtime, else
    device.effective_precision."""
    if effective_runtime(cfg, device) == ORT:
        return "fp32"
    return effective_precision(device, cfg.precision)


class OrtCodes:
    """A CodeExtractor's forward pass in ONNX Runtime: called as the module is,
    x (N, 3, H, W) float32 -> {layer: (N, D) float32}, N any."""

    def __init__(self, session: Any, layers: tuple[str, ...]) -> None:
        self.session, self.layers = session, layers

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = self.session.run(None, {"x": x})
        return {name: torch.from_numpy(v) for name, v in zip(self.layers, out, strict=True)}


def code_model(extractor: CodeExtractor, size: int, cfg: Extract,
               device: torch.device) -> nn.Module | OrtCodes:
    """What computes the codes (`extraction.encode` calls it): the extractor itself on
    `device` in channels_last for torch, or its ONNX graph at `size` px in an ONNX Runtime
    session of torch.get_num_threads() intra-op threads (call device.set_cpu_threads first).
    Raises TlflowError as effective_runtime does, or when the exported graph disagrees with
    torch."""
    if effective_runtime(cfg, device) == "torch":
        return extractor.to(device, memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        session = ort_session(_graph(extractor, size), threads)
    except Exception:  # a damaged file in the cache (ONNX Runtime's own error types)
        session = ort_session(_graph(extractor, size, fresh=True), threads)
    return OrtCodes(session, extractor.layers)


class _Outputs(nn.Module):
    """The extractor's codes as a tuple in its layer order (an ONNX graph's outputs)."""

    def __init__(self, extractor: CodeExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes = self.extractor(x)
        return tuple(codes[name] for name in self.extractor.layers)


def graph_key(extractor: CodeExtractor, size: int) -> str:
    """sha256 naming a graph: the weights and buffers' bytes, the backbone's name and
    structure (its repr), the layers, the input size and the versions of the libraries that
    build and export it (a change to any exports again)."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for name, t in extractor.model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    # the model's name and its structure (batch-norm eps, padding, activations: none of them
    # a weight), and every library that turns it into a graph
    meta = (extractor.name, extractor.layers, size, repr(extractor.model), OPSET,
            *(version(p) for p in ("torch", "timm", "torchvision", "onnxscript", "onnx")))
    h.update(repr(meta).encode())
    return h.hexdigest()


def graph_cache() -> Path:
    """The folder the graphs are kept in: $XDG_CACHE_HOME/tlflow/graphs, else
    ~/.cache/tlflow/graphs (the convention of torch hub, timm and Hugging Face's caches)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tlflow" / "graphs"


def _graph(extractor: CodeExtractor, size: int, fresh: bool = False) -> bytes:
    """The extractor's graph at `size` px (dynamic batch), from the cache or (`fresh`, or
    not there) exported now and kept there."""
    path = graph_cache() / f"{graph_key(extractor, size)}.onnx"
    if not fresh:
        with contextlib.suppress(OSError):
            return path.read_bytes()
    graph = _export(extractor, size)
    # an unwritable cache (read-only, full: atomic_path's TlflowError): kept in memory
    with contextlib.suppress(OSError, TlflowError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(graph)
    return graph


def check_batch(size: int, n: int = 3) -> torch.Tensor:
    """A fixed batch of `n` images for the checks against torch (seeded: the same each
    time); (n, 3, size, size) float32."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def to_onnx(module: nn.Module, example: torch.Tensor, input_name: str,
            output_names: list[str]) -> Any:
    """`module`'s forward(x) as an ONNX program (torch.onnx.export with dynamo=True, the
    torch.export-based exporter, opset OPSET), the batch dimension of x dynamic; its progress
    lines kept off stdout. Returns torch's ONNXProgram (`.save`, `.model_proto`)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return torch.onnx.export(
            module, (example,), dynamo=True, verbose=False, input_names=[input_name],
            output_names=output_names,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
        )


def _export(extractor: CodeExtractor, size: int) -> bytes:
    """Export with to_onnx and check the graph in ONNX Runtime against torch's fp32 codes on
    a fixed batch (TOLERANCE)."""
    module = _Outputs(extractor).float().eval().cpu()
    print(f"{extractor.name}: exporting layers {', '.join(extractor.layers)} at {size} px to "
          f"ONNX for ONNX Runtime (once; kept in {graph_cache()})", file=sys.stderr,
          flush=True)  # stderr: predict's stdout is its CSV
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes
        program = to_onnx(module, torch.zeros(2, 3, size, size), "x", list(extractor.layers))
    graph = program.model_proto.SerializeToString()
    check = check_batch(size)
    with torch.inference_mode():
        want = module(check)
    got = ort_session(graph, torch.get_num_threads()).run(None, {"x": check.numpy()})
    for name, w, g in zip(extractor.layers, want, got, strict=True):
        diff = float(np.abs(g - w.numpy()).max())
        if not diff <= TOLERANCE * max(1.0, float(w.abs().max())):
            raise TlflowError(f"extract.runtime: ONNX Runtime's codes of {name} differ from "
                              f"torch's by {diff:.3g} on the check batch; use "
                              "extract.runtime: torch")
    return graph


def ort_session(graph: bytes | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on a graph (its bytes, or a .onnx file): `threads`
    intra-op threads that sleep rather than spin when idle (decoding threads share the
    cores), or with None ORT's defaults (a thread per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
