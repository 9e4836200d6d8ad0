"""Fine-tuning on several processes, a rank's side: torch DistributedDataParallel.

The finetune stage starts torchrun (tasks/lib/scale/torchrun.py); each process it starts, a rank,
runs the one-process loop of tasks/lib/finetune/loop.py on its share of the
train split (torch's DistributedSampler): gloo on the CPU, nccl on CUDA with one GPU per
process. DDP averages the gradients, so every rank holds the same weights; after every epoch
a digest of them is compared across ranks (`check_same_weights`), and a mismatch stops the
run. Rank 0 alone writes (checkpoints, best weights, the network, the curve) and reads a
checkpoint to resume, which it sends to the others: machines need no shared file system for it.

A rank records how it failed (`worker`) for the stage to say in one line; it receives SIGKILL
when torchrun dies (Linux's parent-death signal), so no rank outlives the launch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tlflow.tasks.lib.core import lifetime
from tlflow.tasks.lib.core.device import resolve_device
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import write_json
from tlflow.tasks.lib.scale.torchrun import JOB, RESULT

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}

class WeightsDiverged(RuntimeError):
    """Ranks hold different weights after an epoch: DDP keeps them equal, so a bug or a
    faulty device; the run stops before a wrong checkpoint is kept."""


# ---------------------------------------------------------------- where this process stands


@dataclass(frozen=True)
class Ranks:
    """This process's place: rank among world, local rank on its machine; `distributed`
    when a process group is up (torchrun), even with one process."""

    rank: int = 0
    world: int = 1
    local: int = 0
    distributed: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that reads checkpoints and writes every file."""
        return self.rank == 0


def current() -> Ranks:
    """This process's ranks (one process, rank 0, when no process group is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 True)


def say(message: str) -> None:
    """A line of the stage's output: printed by rank 0 only (all of it on one process)."""
    if current().main:
        print(message, flush=True)


def device_for(spec: str, key: str = "finetune.device") -> torch.device:
    """The device of this process: resolve_device's, and under torchrun on CUDA the GPU of
    its local rank (one GPU per process)."""
    device = resolve_device(spec, key)
    r = current()
    if r.distributed and device.type == "cuda":
        return torch.device("cuda", r.local)
    return device


def start(spec: str) -> torch.device:
    """In a rank started by torchrun: join the process group (gloo on the CPU, nccl on CUDA,
    from torchrun's environment) and return this rank's device, one GPU per process."""
    device = resolve_device(spec, "finetune.device")
    if device.type == "cuda":
        local, per_node = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        if spec.startswith("cuda:") and per_node > 1:
            raise TlflowError(f"finetune.device: {spec!r} names one GPU, but each of the "
                              f"{per_node} processes takes the GPU of its local rank; use auto "
                              "or cuda")
        if per_node > torch.cuda.device_count():
            raise TlflowError(f"finetune.nproc_per_node: {per_node}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA GPU(s) (one per process)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type])
    return device


# ---------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    """Where a collective's tensors must live: the GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share(n: int) -> int:
    """Items per rank of n under DistributedSampler without drop_last: ceil(n / world) (it
    repeats a few to make the shares equal)."""
    world = current().world
    return -(-n // world)


def shard(n: int) -> range:
    """This rank's indices of n items for evaluation: rank, rank + world, ... (no padding)."""
    r = current()
    return range(r.rank, n, r.world)


def all_sum(values: Iterable[float]) -> list[float]:
    """Sums over ranks (float64); the values themselves on one process."""
    values = list(values)
    if not current().distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_shards(x: torch.Tensor) -> torch.Tensor:
    """Rows computed by each rank on its `shard` (n_k, ...), put back in item order (n, ...)
    on every rank, on the CPU."""
    r = current()
    if not r.distributed:
        return x
    dev = _comm_device()
    size = torch.tensor([len(x)], device=dev)
    sizes = [torch.zeros_like(size) for _ in range(r.world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: len(x)] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in range(r.world)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(counts), *x.shape[1:]), dtype=x.dtype)
    for k, (part, count) in enumerate(zip(parts, counts, strict=True)):
        out[k :: r.world] = part[:count].cpu()
    return out


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (others pass None)."""
    if not current().distributed:
        assert data is not None
        return data
    dev = _comm_device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=dev)
    dist.broadcast(size, 0)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(int(size), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, 0)
    return data if data is not None else bytes(buf.cpu().numpy())


def broadcast_json(obj: Any) -> Any:
    """Rank 0's JSON-able value on every rank (sent as JSON text, never pickled)."""
    if not current().distributed:
        return obj
    return json.loads(broadcast_bytes(json.dumps(obj).encode() if current().main else None))


def _broadcast(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place."""
    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t, 0)
        else:  # channels_last weights: send a contiguous copy
            buf = t.contiguous()
            dist.broadcast(buf, 0)
            t.copy_(buf)


def broadcast_state(model: nn.Module) -> None:
    """Every parameter and buffer of rank 0 on every rank (after rank 0 alone loaded them)."""
    if current().distributed:
        with torch.no_grad():
            _broadcast(model.state_dict().values())


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: with bn: train each rank's
    last batch moved its own; DDP itself sends rank 0's at every forward."""
    if current().distributed:
        with torch.no_grad():
            _broadcast(model.buffers())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model to train: DDP around it under torchrun (it starts every rank from rank 0's
    weights and averages gradients), the model itself on one process."""
    if not current().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, values in logical order:
    the memory format does not count)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_weights(model: nn.Module, epoch: int) -> str:
    """The weights' digest, compared across ranks; WeightsDiverged when a rank's differs."""
    digest = weights_digest(model)
    r = current()
    if not r.distributed:
        return digest
    dev = _comm_device()
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=dev)
    every = [torch.empty_like(mine) for _ in range(r.world)]
    dist.all_gather(every, mine)
    digests = [bytes(t.cpu().tolist()).hex() for t in every]
    odd = [k for k, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise WeightsDiverged(
            f"after epoch {epoch}, rank(s) {odd} hold other weights than rank 0 (sha256 "
            f"{', '.join(d[:12] for d in digests)}): DDP keeps them equal, so this is a bug "
            "or a faulty device")
    return digest


# ---------------------------------------------------------------- a rank's life


def die_with_parent() -> None:
    """First thing in a rank: ask Linux for SIGKILL when torchrun (its parent) dies; torchrun
    starts its ranks in sessions of their own, so nothing else would stop them."""
    lifetime.die_with_parent(signal.SIGKILL, os.getppid())


def _is_peer_failure(err: BaseException) -> bool:
    """A collective broken by another rank's death (the consequence, not the cause)."""
    text = str(err)
    return (isinstance(err, getattr(dist, "DistError", ())) or "by peer" in text
            or "Connection reset" in text or "Broken pipe" in text)


def _record(job_dir: Path, rank: int, kind: str, err: BaseException) -> None:
    """rank-<r>.json: kind (input | crash | peer), the one-line message, the traceback."""
    message = (str(err) if isinstance(err, TlflowError)
               else f"{type(err).__name__}: {' '.join(str(err).split())}")
    write_json(job_dir / f"rank-{rank}.json", {
        "rank": rank, "kind": kind, "message": message,
        "traceback": "".join(traceback.format_exception(err))})


def worker(job_dir: Path, body: Callable[[dict], dict | None]) -> int:
    """Run one rank's `body(job)` under torchrun; the exit status (0, 2 bad input, 1 crash).
    Rank 0 writes the result; a failure is recorded for the stage to report in one line."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = body(json.loads((job_dir / JOB).read_text()))
        if rank == 0:
            write_json(job_dir / RESULT, result)
    except TlflowError as err:
        _record(job_dir, rank, "input", err)
        return 2
    except BaseException as err:  # any failure at all: recorded, reported by the stage
        _record(job_dir, rank, "peer" if _is_peer_failure(err) else "crash", err)
        return 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
