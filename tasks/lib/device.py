"""Where the network runs: device, decoder processes, mixed precision."""

from __future__ import annotations

import contextlib
import os

import torch

from tlflow.tasks.lib.errors import TlflowError

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


def set_cpu_threads(device: torch.device, workers: int) -> None:
    """On CPU, the forward and backward passes compute on the cores the decoders leave
    (cores - workers, at least 1; under torchrun each of LOCAL_WORLD_SIZE ranks gets its
    share of the cores), set here every time rather than inherited: oneDNN's sums
    differ in the last bits with the thread count, and what a process starts with depends
    on its environment (OMP_NUM_THREADS, which Dask's nanny sets to 1) and on which stage
    ran before in it (extract computing codes, or finding them all cached)."""
    if device.type == "cpu":
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks - workers))


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision the network really computes in: the asked one on CUDA, fp32 on CPU."""
    return precision if device.type == "cuda" and precision in _AUTOCAST else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 or fp16); the CPU computes in fp32."""
    if effective_precision(device, precision) != "fp32":
        return torch.autocast("cuda", dtype=_AUTOCAST[precision])
    return contextlib.nullcontext()
