"""Sharded extraction on Dask against the local executor, side by side in one run.

(a) the extract stage, local executor;
(b) executor dask, a LocalCluster of 2 worker processes started by the stage (start-up counted);
(c) executor dask, an existing `dask scheduler` + `dask worker --nworkers 2 --nthreads 1` on
    127.0.0.1, started before the run (the workers build the network in the run: counted);
(a') the local executor again, after (c): the machine is shared, its load drifts, and the
    ratios are taken against the mean of (a) and (a');
(d) the merge alone: shard files of 4096 codes committed into a store (read + append + flush).
Each run computes every image of a fresh store; codes are compared with (a) bit for bit.
Bytes moved per image: the task spec sent to a worker, its answer, the shard file it writes
(and the stage reads back), and the image it reads.

    python bench/scale_extract.py [--images 1600] [--image-size 224] [--shard-size 200]

Images: ../shared/datasets/hymenoptera with mirrored, flipped and rotated copies.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(log: Path) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and `dask worker --nworkers 2 --nthreads 1` on loopback."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = Path(sys.executable).parent / "dask"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = open(log, "w")  # noqa: SIM115 - lives as long as the processes
    procs = [subprocess.Popen([str(dask), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
             for args in (["scheduler", "--host", "127.0.0.1", "--port", str(port),
                           "--no-dashboard"],
                          ["worker", address, "--nworkers", "2", "--nthreads", "1",
                           "--host", "127.0.0.1", "--no-dashboard"])]
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    return address, procs


class Meter:
    """Wraps the stage's shard commits to count shard-file bytes, rows and merge seconds, and
    the submitted jobs' pickled sizes (what the scheduler sends a worker)."""

    def __init__(self) -> None:
        from tlflow.tasks.lib.scale import sharding

        self.sharding, self.file_bytes, self.rows, self.seconds = sharding, 0, 0, 0.0
        self.spec_bytes, self.answer_bytes = 0, 0
        self._commit, self._compute = sharding.commit_shard, sharding.compute_shard

    def __enter__(self) -> Meter:
        def commit(store, path, ext_id, have):
            self.file_bytes += path.stat().st_size
            t0 = time.perf_counter()
            n = self._commit(store, path, ext_id, have)
            self.seconds += time.perf_counter() - t0
            self.rows += n
            return n

        self.sharding.commit_shard = commit
        return self

    def __exit__(self, *exc: object) -> None:
        self.sharding.commit_shard = self._commit


def run_stage(work: Path, folder: Path, size: int, **extract: object) -> tuple[float, dict]:
    """Seconds of one extract run computing every image, and the codes by layer."""
    from tlflow.tasks import extract as stage
    from tlflow.tasks import ingest
    from tlflow.tasks.lib.core.params import params_under
    from tlflow.tasks.lib.data.manifest import read_manifest
    from tlflow.tasks.lib.features.store import FeatureStore

    params = params_under(work, ROOT / "params.yaml",
                          ingest={"source": "folder", "path": str(folder)},
                          extract={"layers": ["pooled", "blocks.4"], "image_size": size,
                                   "device": "cpu", **extract})
    ingest.run(params)
    t0 = time.perf_counter()
    path = stage.run(params)
    seconds = time.perf_counter() - t0
    keys = sorted({r.sha256 for r in read_manifest(params.base.paths.manifest)})
    with FeatureStore(path) as store:
        return seconds, {layer: store.read(layer, keys) for layer in store.layers}


def merge_rate(tmp: Path, shards: int, rows: int = 4096, dims: dict | None = None) -> float:
    """Codes per second the stage commits from shard files (read, append, flush, delete)."""
    from tlflow.tasks.lib.features.store import FeatureStore
    from tlflow.tasks.lib.scale.sharding import commit_shard, write_shard

    dims = dims or {"pooled": 1280}
    rng = np.random.default_rng(0)
    folder = tmp / "merge"
    paths = []
    for s in range(shards):
        keys = [f"{s:08x}{i:056x}" for i in range(rows)]
        codes = {k: rng.normal(size=(rows, d)).astype(np.float16) for k, d in dims.items()}
        paths.append(folder / f"{s}.h5")
        write_shard(paths[-1], "bench", keys, codes, [])
    have: set[str] = set()
    with FeatureStore.create(folder / "store.h5", {"x": 1}, dims, "float16") as store:
        t0 = time.perf_counter()
        for p in paths:
            commit_shard(store, p, "bench", have)
        return shards * rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=200)
    args = ap.parse_args()

    from extract import make_images

    from tlflow.tasks.lib.scale.sharding import ShardDone, ShardJob

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = make_images(tmp / "images", args.images)
        files = sorted(folder.rglob("*.jpg"))
        image_bytes = sum(f.stat().st_size for f in files) / len(files)
        common = {"batch_size": args.batch_size}
        dask = {**common, "executor": "dask", "shard_size": args.shard_size}
        t_local, want = run_stage(tmp / "local", folder, args.image_size, **common)
        with Meter() as m_lc:
            t_lc, got_lc = run_stage(tmp / "lc", folder, args.image_size, **dask,
                                     dask_workers=2)
        address, procs = start_cluster(tmp / "dask.log")
        try:
            with Meter() as m_ex:
                t_ex, got_ex = run_stage(tmp / "ex", folder, args.image_size, **dask,
                                         dask_address=address)
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        t_local2, _ = run_stage(tmp / "local2", folder, args.image_size, **common)
        merge_1280 = merge_rate(tmp / "m1", 12)
        merge_both = merge_rate(tmp / "m2", 12, dims={"pooled": 1280, "blocks.4": 112})
        from tlflow.tasks.lib.core.params import Extract

        job = ShardJob("0" * 16, Extract(**dask), 0, args.image_size, {"torch": "x"},
                       tuple(str(f.resolve()) for f in files[: args.shard_size]),
                       tuple("0" * 64 for _ in range(args.shard_size)), str(tmp / "x.h5"))
        import cloudpickle

        spec = len(cloudpickle.dumps(job)) / args.shard_size
        answer = len(pickle.dumps(ShardDone(str(tmp / "x.h5"), args.shard_size)))
    n = len(files)
    same = all(np.array_equal(want[k], got[k]) for got in (got_lc, got_ex) for k in want)
    print(f"images: {n} at {args.image_size} px, batch {args.batch_size}, "
          f"shards of {args.shard_size}; {os.cpu_count()} cores")
    print(f"(a) local executor                 {t_local:7.1f} s  {n / t_local:6.1f} img/s")
    print(f"    and again after (c)            {t_local2:7.1f} s  {n / t_local2:6.1f} img/s")
    print(f"(b) LocalCluster, 2 workers        {t_lc:7.1f} s  {n / t_lc:6.1f} img/s "
          "(cluster start-up included)")
    print(f"(c) existing cluster, 2 workers    {t_ex:7.1f} s  {n / t_ex:6.1f} img/s")
    print(f"    codes equal to (a), every layer bit for bit: {same}")
    print(f"(d) merge, 4096-code shards, pooled 1280 fp16      {merge_1280:9.0f} codes/s")
    print(f"    merge, pooled 1280 + blocks.4 112 fp16          {merge_both:9.0f} codes/s")
    print(f"    merge inside (b): {m_lc.rows} codes in {m_lc.seconds:.2f} s "
          f"({m_lc.rows / max(m_lc.seconds, 1e-9):.0f} codes/s); (c): {m_ex.rows} in "
          f"{m_ex.seconds:.2f} s")
    print(f"bytes per image: task spec {spec:.0f} (scheduler -> worker), answer "
          f"{answer / args.shard_size:.1f} (worker -> stage), shard file "
          f"{m_ex.file_bytes / max(m_ex.rows, 1):.0f} (worker writes, stage reads), "
          f"image read by a worker {image_bytes:.0f}")
    local = (t_local + t_local2) / 2  # the machine is shared: its load drifts during the run
    print(f"ratio LocalCluster / local throughput: {local / t_lc:.2f}  (goal >= 0.7)")
    print(f"ratio existing cluster / local throughput: {local / t_ex:.2f}  (goal >= 0.7)")


if __name__ == "__main__":
    main()
