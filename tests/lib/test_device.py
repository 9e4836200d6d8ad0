"""Device, decoder processes and the precision the network really computes in."""

import pytest
import torch

from tlflow.tasks.lib.core.device import (
    autocast,
    effective_precision,
    resolve_device,
    resolve_workers,
)
from tlflow.tasks.lib.core.errors import TlflowError


def test_precision_auto_is_bf16_where_the_hardware_computes_it(monkeypatch):
    """auto: bf16 on a CPU with AMX or AVX512-BF16 (torch's probe), fp32 on one without;
    bf16 and fp32 are taken as asked; fp16 is CUDA's only."""
    import tlflow.tasks.lib.core.device as device

    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    probe = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert device.cpu_has_bf16() == probe
    assert effective_precision(cpu, "auto") == ("bf16" if probe else "fp32")
    assert [effective_precision(cpu, p) for p in ("bf16", "fp16", "fp32")] == [
        "bf16", "fp32", "fp32"]
    assert [effective_precision(cuda, p) for p in ("bf16", "fp16", "fp32")] == [
        "bf16", "fp16", "fp32"]
    for has in (True, False):  # the rule on the other kind of CPU than this one
        monkeypatch.setattr(device, "cpu_has_bf16", lambda has=has: has)
        assert effective_precision(cpu, "auto") == ("bf16" if has else "fp32")
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "fp16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_devices_and_workers():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_workers(3, torch.device("cpu")) == 3
    assert resolve_workers(None, torch.device("cpu")) == 0  # the cores compute
    assert 1 <= resolve_workers(None, torch.device("cuda:0")) <= 8
    if not torch.cuda.is_available():
        with pytest.raises(TlflowError, match=r"extract.device: 'cuda:1' asked for"):
            resolve_device("cuda:1")


def test_cpu_threads_are_set_not_inherited(monkeypatch):
    """Whatever a process starts with (OMP_NUM_THREADS=1 from Dask's nanny, a stage before),
    every CPU loader computes on the same count: codes and weights depend on it."""
    import os

    import torch

    from tlflow.tasks.lib.core.device import set_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        torch.set_num_threads(1)
        set_cpu_threads(torch.device("cpu"), 0)
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(os.cpu_count() or 1))  # a rank per core
        set_cpu_threads(torch.device("cpu"), 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
