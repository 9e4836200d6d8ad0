"""Extraction sharded on a Dask cluster (`extract.executor: dask`).

The extract stage cuts the keys the store lacks into shards of `extract.shard_size` images and
submits one task per shard with `distributed.Client` (a LocalCluster it starts, or an existing
scheduler by address). A worker builds the network once per process (cached by extractor id),
decodes and encodes its shard's images in batches padded to one shape, as the local executor
does (extraction.encode_batch), and writes one HDF5 shard file atomically (a temporary name,
then a rename) into `<store>.shards/`, named by a hash of the extractor id and the shard's
keys: a shard Dask computes again (its worker died) rewrites the same file, or finds it
done. A worker returns only a small record (ShardDone: path, rows, unreadable images), never arrays.

The stage, the store's only writer, appends each finished shard under the writer lock as it
arrives (FeatureStore.append advances the committed counter) and then deletes the file; at the
start of a run it commits the finished shard files a killed run left (`commit_leftovers`).
Worker code never imports Prefect: a flow's workers cannot start Prefect servers of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import TEMP_PREFIX, atomic_path
from tlflow.tasks.lib.core.params import Extract
from tlflow.tasks.lib.core.progress import Progress
from tlflow.tasks.lib.data.manifest import Row
from tlflow.tasks.lib.features.store import FeatureStore, extractor_id, library_versions

SHARD_ATTR = "extractor_id"  # a shard file's attribute: the extractor its codes belong to
BAD_ATTR = "bad"  # JSON list of [index in the shard, reason] for the unreadable images
CONNECT_TIMEOUT_S = 10.0  # an existing scheduler: how long to try to reach it
WAIT_FOR_WORKERS_S = 60.0  # an existing scheduler with no worker: how long to wait for one


def shard_folder(store: Path) -> Path:
    """Where the shard files of one store wait to be committed: `<features>/<id>.shards/`."""
    return store.with_name(store.stem + ".shards")


def shard_name(ext_id: str, keys: list[str]) -> str:
    """A shard file's name: a hash of the extractor id and the shard's keys, so the same
    shard computed again (a dead worker, a rerun) names the same file."""
    digest = hashlib.sha256("\n".join([ext_id, *keys]).encode()).hexdigest()[:32]
    return f"{digest}.h5"


@dataclass(frozen=True)
class ShardJob:
    """What one worker needs for one shard (small: names and paths, no arrays)."""

    ext_id: str  # the stage's extractor id; the worker's own must equal it
    cfg: Extract
    seed: int
    size: int  # input side in pixels, as the stage chose it
    versions: dict[str, str]  # the stage's torch, timm, ... versions; the worker's must match
    files: tuple[str, ...]  # absolute image paths (a file system the workers share)
    keys: tuple[str, ...]
    path: str  # the shard file to write


@dataclass(frozen=True)
class ShardDone:
    """A worker's answer: where the codes are, how many rows, which images were unreadable
    (index in the shard, reason), whether a finished file was found rather than computed."""

    path: str
    rows: int
    bad: tuple[tuple[int, str], ...] = field(default=())
    reused: bool = False


# ---------------------------------------------------------------- shard files


def write_shard(path: Path, ext_id: str, keys: list[str], codes: dict[str, np.ndarray],
                bad: list[tuple[int, str]]) -> None:
    """One shard file, atomically: `keys` (n, S64), `layers/<name>` (n, D) in the store's
    dtype, the extractor id and the unreadable images as attributes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", locking=False) as h5:
        h5.create_dataset("keys", data=np.array(keys, dtype="S64"))
        for name, arr in codes.items():
            h5.create_dataset(f"layers/{name}", data=arr)
        h5.attrs[SHARD_ATTR] = ext_id
        h5.attrs[BAD_ATTR] = json.dumps(bad)


def read_shard(path: Path, ext_id: str) -> tuple[list[str], dict[str, np.ndarray],
                                                   list[tuple[int, str]]]:
    """(keys, {layer: (n, D) codes}, unreadable images) of a shard file of this extractor.
    Raises TlflowError for a file that is not one (unreadable, another extractor)."""
    try:
        with h5py.File(path, "r", locking=False) as h5:
            if h5.attrs.get(SHARD_ATTR) != ext_id:
                raise TlflowError(f"{path}: a shard of another extractor")
            keys = [k.decode() for k in h5["keys"][:]]
            codes = {name: ds[:] for name, ds in h5["layers"].items()}
            bad = [(int(i), str(r)) for i, r in json.loads(h5.attrs[BAD_ATTR])]
    except (OSError, KeyError, ValueError) as err:
        raise TlflowError(f"{path}: not a readable shard file ({err})") from None
    return keys, codes, bad


def commit_shard(store: FeatureStore, path: Path, ext_id: str, have: set[str]) -> int:
    """Append a shard file's rows that the store lacks (under the caller's writer lock), then
    delete the file; `have` (the committed keys) is updated. Returns the rows appended."""
    keys, codes, _ = read_shard(path, ext_id)
    new = [i for i, k in enumerate(keys) if k not in have]
    if new:
        if len(new) < len(keys):
            codes = {name: arr[new] for name, arr in codes.items()}
            keys = [keys[i] for i in new]
        store.append(keys, codes)
        have.update(keys)
    path.unlink()
    return len(new)


def commit_leftovers(store: FeatureStore, ext_id: str, have: set[str]) -> int:
    """Commit the finished shard files a killed run left (a file that is not a whole shard
    of this extractor is deleted: its images are still missing, so they are computed again).
    Returns the rows appended."""
    folder = shard_folder(store.path)
    rows = 0
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            rows += commit_shard(store, path, ext_id, have)
        except TlflowError as err:
            print(f"extract: removed {err}", flush=True)
            path.unlink()
    return rows


def clean_folder(store: Path) -> None:
    """After a whole run: remove the temporary files of shards whose worker died, and the
    folder once it is empty."""
    folder = shard_folder(store)
    if not folder.is_dir():
        return
    for tmp in folder.glob(f"{TEMP_PREFIX}*.tmp"):
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


# ---------------------------------------------------------------- the worker's side

# extractor id -> (CodeExtractor or OrtCodes, transform, decode side, device), built once per
# worker process
_MODELS: dict[str, tuple[Any, Any, int | None, torch.device]] = {}
_ONE_SHARD_AT_A_TIME = threading.Lock()  # a worker's threads compute one shard, with all of them


def _worker_threads() -> int:
    """The threads Dask gives this worker (1 in the clusters tlflow starts), else torch's."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except ValueError:  # not inside a Dask worker (a direct call)
        return torch.get_num_threads()


def _model(job: ShardJob) -> tuple[Any, Any, int | None, torch.device]:
    """This process's network for the job's extractor, built once; refused when the worker
    would compute other codes than the stage (other weights, libraries or precision)."""
    if job.ext_id in _MODELS:
        return _MODELS[job.ext_id]
    from tlflow.tasks.lib.core.device import resolve_device
    from tlflow.tasks.lib.features.backbones import create_backbone
    from tlflow.tasks.lib.features.codes import CodeExtractor
    from tlflow.tasks.lib.features.extraction import decode_side, describe_extractor
    from tlflow.tasks.lib.features.runtime import code_model

    ours = library_versions()
    differ = sorted(k for k in job.versions if ours.get(k) != job.versions[k])
    if differ:
        raise TlflowError(f"extract: a Dask worker has other library versions than the stage "
                          f"({', '.join(f'{k} {ours.get(k)} vs {job.versions[k]}' for k in differ)}"
                          "); install the same environment on every worker")
    device = resolve_device(job.cfg.device)
    backbone = create_backbone(job.cfg.backbone, job.cfg.weights, None, job.seed)
    backbone.resize(job.size)
    own = extractor_id(describe_extractor(backbone.identity(), job.cfg, device))
    if own != job.ext_id:
        raise TlflowError(f"extract: a Dask worker computes extractor {own}, the stage "
                          f"{job.ext_id} (other weights file, preprocessing, precision or runtime "
                          f"on {device}); give every worker the same weights and set "
                          "extract.device, extract.precision and extract.runtime explicitly")
    model = code_model(CodeExtractor(backbone, job.cfg.layers), job.size, job.cfg, device)
    _MODELS[job.ext_id] = model, backbone.transform(), decode_side(backbone, job.cfg), device
    return _MODELS[job.ext_id]


def compute_shard(job: ShardJob) -> ShardDone:
    """Codes of one shard's images into its shard file (runs on a Dask worker, or anywhere).

    Each batch is padded to `batch_size` as in the local executor (extraction.encode_batch),
    so the codes are the local executor's on the same CPU type. A finished
    file of the same name is taken as it is (atomic rename: it is whole). Raises TlflowError
    when the worker cannot compute the stage's codes (see `_model`)."""
    from tlflow.tasks.lib.core.device import resolve_device
    from tlflow.tasks.lib.features.extraction import ImageFiles, collate, encode_batch

    path = Path(job.path)
    if path.is_file():
        with contextlib.suppress(TlflowError):
            keys, _, bad = read_shard(path, job.ext_id)
            return ShardDone(job.path, len(keys), tuple(bad), reused=True)
    with _ONE_SHARD_AT_A_TIME:
        if resolve_device(job.cfg.device).type == "cpu":  # set before _model's first call:
            torch.set_num_threads(_worker_threads())  # an ORT session takes the count then
        model, transform, side, device = _model(job)
        loader = torch.utils.data.DataLoader(
            ImageFiles([Path(f) for f in job.files], transform, side),
            batch_size=job.cfg.batch_size,
            num_workers=0, collate_fn=collate)  # no processes inside a (daemonic) worker
        keys, parts, bad = [], [], []
        for batch in loader:
            bad.extend(batch.errors)
            if batch.images is not None:
                keys.extend(job.keys[i] for i in batch.indices)
                parts.append(encode_batch(model, batch.images, job.cfg, device))
        if not parts:  # a shard of unreadable images only: the layers' widths from a zero image
            zero = torch.zeros(1, 3, job.size, job.size)
            parts = [{k: v[:0] for k, v in encode_batch(model, zero, job.cfg, device).items()}]
    codes = {name: np.concatenate([p[name] for p in parts]) for name in job.cfg.layers}
    write_shard(path, job.ext_id, keys, codes, bad)
    return ShardDone(job.path, len(keys), tuple(bad))


# ---------------------------------------------------------------- the stage's side


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """distributed's INFO lines (clients connecting, a comm closed at shutdown, with its
    traceback) stay out of the stage's output, inside a Prefect run too (Prefect's logging
    set-up shows them); warnings (a worker lost) still show."""
    import logging

    log = logging.getLogger("distributed")
    level = log.level
    log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def dask_client(cfg: Extract) -> Iterator[Any]:
    """A distributed.Client: on an existing scheduler (`extract.dask_address`), or on a
    LocalCluster of `extract.dask_workers` processes (null: one per core), one thread each,
    closed on exit. Raises TlflowError when the scheduler cannot be reached or has no
    worker within WAIT_FOR_WORKERS_S."""
    import logging

    from distributed import Client, LocalCluster

    if cfg.dask_address is None:
        n = cfg.dask_workers or os.cpu_count() or 1
        # dashboard ":0", a free port: None still binds the scheduler's HTTP server to 8787
        # and warns on stderr when that port is taken (a notebook's cluster, another run)
        with _quiet_distributed(), LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(cfg.dask_address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        raise TlflowError(f"extract.dask_address: no Dask scheduler answers at "
                          f"{cfg.dask_address} ({err})") from None
    with _quiet_distributed(), client:
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:
            raise TlflowError(f"extract.dask_address: the scheduler at {cfg.dask_address} has "
                              f"no worker (waited {WAIT_FOR_WORKERS_S:g} s)") from None
        yield client


def cut(todo: list[Row], shard_size: int) -> list[list[Row]]:
    """Shards of `shard_size` images in `todo`'s order (any cut gives the same codes: each
    forward pass is padded to one batch shape, extraction.encode_batch)."""
    return [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]


@dataclass
class MergeTiming:
    """What the stage spent committing shards: rows and seconds (reading + appending)."""

    rows: int = 0
    seconds: float = 0.0


def extract_on_dask(store: FeatureStore, todo: list[Row], images: Path, job: ShardJob,
                    timing: MergeTiming | None = None) -> list[dict[str, str]]:
    """Compute `todo`'s codes on the cluster, committing each shard as it arrives; return
    the unreadable images (relpath, sha256, reason). `job` carries the stage's extractor
    (its files, keys and path are filled per shard). With `on_bad_image: fail`, the first
    unreadable image raises TlflowError (committed shards stay)."""
    from distributed import as_completed

    folder = shard_folder(store.path).resolve()  # workers run in other folders
    folder.mkdir(parents=True, exist_ok=True)
    have = set(store.keys())
    timing = timing if timing is not None else MergeTiming()
    shards = cut(todo, job.cfg.shard_size)
    bad: list[dict[str, str]] = []
    with dask_client(job.cfg) as client:
        # shards finish in bursts: the rate counts from submission, not from the first burst
        progress = Progress("extract", len(todo), since_start=True)
        print(f"extract: {len(shards)} shard(s) of up to {len(shards[0])} images on Dask "
              f"({client.scheduler.address}, {len(client.scheduler_info()['workers'])} "
              "worker(s))", flush=True)
        futures = {}
        for rows in shards:
            keys = [r.sha256 for r in rows]
            name = shard_name(job.ext_id, keys)
            one = ShardJob(job.ext_id, job.cfg, job.seed, job.size, job.versions,
                           tuple(str((images / r.relpath).resolve()) for r in rows),
                           tuple(keys), str(folder / name))
            futures[client.submit(compute_shard, one, key=f"tlflow-shard-{name}")] = rows
        try:
            for future in as_completed(futures):
                done: ShardDone = future.result()
                rows = futures.pop(future)
                future.release()
                for i, reason in done.bad:
                    if job.cfg.on_bad_image == "fail":
                        raise TlflowError(reason)
                    print(f"extract: skipped {reason}", flush=True)
                    bad.append({"relpath": rows[i].relpath, "sha256": rows[i].sha256,
                                "reason": reason})
                t0 = time.perf_counter()
                timing.rows += commit_shard(store, Path(done.path), job.ext_id, have)
                timing.seconds += time.perf_counter() - t0
                progress.advance(len(rows))
        finally:
            progress.close()
            client.cancel(list(futures))
    return bad
