"""Where the network runs: device, decoder processes, mixed precision."""

from __future__ import annotations

import contextlib
import os

import torch

from tasks.lib.errors import TlflowError

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


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision the network really computes in: the asked one on CUDA, fp32 on CPU."""
    return precision if device.type == "cuda" and precision in _AUTOCAST else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 or fp16); the CPU computes in fp32."""
    if effective_precision(device, precision) != "fp32":
        return torch.autocast("cuda", dtype=_AUTOCAST[precision])
    return contextlib.nullcontext()
