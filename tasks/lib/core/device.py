"""Where the network runs: device, decoder processes, mixed precision (bf16 on CUDA and on
CPUs with bf16 in hardware)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from tlflow.tasks.lib.core.errors import TlflowError

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


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AMX tiles (Intel Sapphire Rapids on) or
    AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 on), as torch's own CPU probe (cpuinfo) says,
    asked once. oneDNN then runs bf16 convolutions and matmuls natively; elsewhere it
    emulates them, slower than fp32."""
    probe = getattr(torch, "cpu", None)
    try:
        return bool(probe._is_amx_tile_supported() or probe._is_avx512_bf16_supported())
    except AttributeError:  # a torch without the probe: assume the common case, no bf16
        return False


def effective_precision(device: torch.device, precision: str, allow_fp16: bool = True) -> str:
    """The precision the network really computes in, one of bf16, fp16 or fp32.

    `auto`: bf16 on a CUDA GPU that computes it natively (Ampere on), else fp16 there (fp32
    where `allow_fp16` is False: training in fp16 needs loss scaling), and bf16 on a CPU with
    AMX or AVX512-BF16 (`cpu_has_bf16`), fp32 elsewhere. `bf16` and `fp32` are taken as
    asked on either device; `fp16` is CUDA's only (a CPU computes fp32 instead).
    """
    if precision == "auto":
        if device.type == "cuda":
            with torch.cuda.device(device):
                if torch.cuda.is_bf16_supported(including_emulation=False):
                    return "bf16"
            return "fp16" if allow_fp16 else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str,
             allow_fp16: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision (torch.autocast) in the effective precision; nothing for fp32."""
    effective = effective_precision(device, precision, allow_fp16)
    if effective == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[effective])
