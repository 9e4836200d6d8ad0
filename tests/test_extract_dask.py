"""The extract stage on Dask (`extract.executor: dask`): a LocalCluster it starts, and an
existing `dask scheduler` + `dask worker` on loopback. Each gives the local executor's codes bit
for bit; a worker SIGKILLed mid-run and a stage SIGKILLed mid-run still end with them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from tests.conftest import BIN, ROOT, _free_port, colour_images, make_params, wait_for
from tlflow.tasks import extract, ingest
from tlflow.tasks.lib.core.params import Params, params_under
from tlflow.tasks.lib.data.manifest import read_manifest
from tlflow.tasks.lib.features.store import FeatureStore
from tlflow.tasks.lib.scale.sharding import read_shard, shard_folder

# batch 32: with every pass padded to it, 1 and 2 threads give the same codes (README)
TINY = {"weights": "packaged", "layers": ["pooled", "blocks.2"], "image_size": 32,
        "batch_size": 32}
SHARDED = {**TINY, "executor": "dask", "shard_size": 4}  # 36 images: 9 shards


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_images(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def local_codes(tmp_path_factory: pytest.TempPathFactory, images: Path) -> dict:
    """{layer: codes in key order} from the local executor, and the keys."""
    params = _project(tmp_path_factory.mktemp("local"), images)
    return _codes(params, extract.run(params))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """An existing cluster on loopback: `dask scheduler` and `dask worker --nworkers 2
    --nthreads 1`, as a user starts them; its address. Both process groups are killed after."""
    log = tmp_path_factory.mktemp("dask") / "dask.log"
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the workers unpickle this module's plugin
    procs = []
    with open(log, "w") as out:
        for args in (["scheduler", "--host", "127.0.0.1", "--port", str(port),
                      "--no-dashboard"],
                     ["worker", address, "--nworkers", "2", "--nthreads", "1",
                      "--host", "127.0.0.1", "--no-dashboard"]):
            procs.append(subprocess.Popen([str(BIN / "dask"), *args], env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        with Client(address, timeout=1800) as client:
            client.wait_for_workers(2, timeout=1800)
        yield address
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _project(root: Path, images: Path, **extract_params: object) -> Params:
    params = make_params(root, ingest={"source": "folder", "path": str(images)},
                         extract={**TINY, **extract_params})
    ingest.run(params)
    return params


def _codes(params: Params, store: Path) -> dict:
    keys = sorted(r.sha256 for r in read_manifest(params.base.paths.manifest))
    with FeatureStore(store) as s:
        assert s.n_committed == len(set(s.keys())) == 36  # every image once, none twice
        return {"keys": sorted(s.keys()), **{layer: s.read(layer, keys) for layer in s.layers}}


def _assert_same(got: dict, want: dict) -> None:
    assert got["keys"] == want["keys"]
    assert set(got) == set(want)
    for layer in set(want) - {"keys"}:
        np.testing.assert_array_equal(got[layer], want[layer], err_msg=layer)


def test_a_local_cluster_gives_the_local_codes(tmp_path: Path, images: Path, local_codes,
                                               capsys):
    params = _project(tmp_path, images, **SHARDED, dask_workers=2)
    store = extract.run(params)
    out = capsys.readouterr().out
    assert "9 shard(s) of up to 4 images on Dask" in out and "2 worker(s)" in out, out
    _assert_same(_codes(params, store), local_codes)
    assert not shard_folder(store).exists()  # every shard file committed and removed
    extract.run(params)
    assert "0 of 36 images to compute" in capsys.readouterr().out


def test_an_existing_cluster_gives_the_local_codes(tmp_path: Path, images: Path, local_codes,
                                                   cluster: str, capsys):
    params = _project(tmp_path, images, **SHARDED, dask_address=cluster)
    store = extract.run(params)
    assert f"on Dask ({cluster}, 2 worker(s))" in capsys.readouterr().out
    _assert_same(_codes(params, store), local_codes)
    with Client(cluster) as client:  # worker code never imports Prefect: no servers of its own
        assert not any(client.run(lambda: "prefect" in sys.modules).values())


class KillFirstShard(WorkerPlugin):
    """SIGKILLs the worker process that starts executing the first tlflow shard (one kill in
    the whole cluster: a marker file is created exclusively)."""

    name = "tlflow-test-kill"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or not str(key).startswith("tlflow-shard-"):
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_shard_costs_that_shard_only(tmp_path: Path, images: Path,
                                                         local_codes, cluster: str):
    params = _project(tmp_path, images, **SHARDED, dask_address=cluster)
    marker = tmp_path / "killed"
    with Client(cluster) as client:
        before = set(client.scheduler_info()["workers"])
        client.register_plugin(KillFirstShard(str(marker)))
        try:
            store = extract.run(params)
        finally:
            client.unregister_worker_plugin(KillFirstShard.name)
        client.wait_for_workers(2, timeout=1800)  # the nanny restarted the killed one
        after = set(client.scheduler_info()["workers"])
    assert marker.exists() and before - after, "no worker was killed"
    _assert_same(_codes(params, store), local_codes)
    assert not shard_folder(store).exists()


KILLER = """
import os, signal, sys
from tlflow.flows.cli import main
import tlflow.tasks.lib.scale.sharding as sharding

calls = 0
real = sharding.commit_shard

def commit_shard(store, path, ext_id, have):
    global calls
    calls += 1
    if calls == {k}:  # the shard file is finished; die before committing it
        os.kill(os.getpid(), signal.SIGKILL)
    return real(store, path, ext_id, have)

sharding.commit_shard = commit_shard
sys.exit(main(["stage", "extract"]))
"""


@pytest.mark.faults  # make faults (CI), not make test
def test_a_stage_killed_mid_run_resumes_without_recomputing(tmp_path: Path, images: Path,
                                                            local_codes, cluster: str):
    """`tlflow stage extract` (what dvc repro runs) SIGKILLed before committing its third
    shard: the rerun commits the finished shard files, computes only the rest, and the store
    holds every image once with the local executor's codes."""
    root = tmp_path / "project"
    root.mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(images))
    raw["extract"].update(SHARDED, dask_address=cluster)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, text=True,
                              capture_output=True, timeout=1800)

    stage = "import sys; from tlflow.flows.cli import main; sys.exit(main(['stage', '{s}']))"
    assert run(stage.format(s="ingest")).returncode == 0
    proc = run(KILLER.format(k=3))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = next((root / "features").glob("*.h5"))
    with FeatureStore(store) as s:
        committed = s.n_committed
    assert committed == 8  # two shards of 4
    with Client(cluster) as client:  # the shards running when the stage died end, unheard
        wait_for(lambda: not any(client.run(
            lambda dask_worker: dask_worker.state.executing_count).values()), 300, "idle workers")
    folder = shard_folder(store)
    finished = sum(len(read_shard(p, store.stem)[0]) for p in folder.glob("*.h5"))
    assert finished >= 4  # at least the shard the stage died before committing
    proc = run(stage.format(s="extract"))
    assert proc.returncode == 0, proc.stderr
    assert f"committed {finished} codes from finished shard files" in proc.stdout
    assert f"{36 - committed - finished} of 36 images to compute" in proc.stdout
    _assert_same(_codes(params_under(root, root / "params.yaml"), store), local_codes)
    assert not folder.exists()


def test_shard_files_are_checked_and_a_missing_scheduler_is_one_line(tmp_path: Path,
                                                                     images: Path,
                                                                     monkeypatch):
    from tlflow.tasks.lib.core.errors import TlflowError
    from tlflow.tasks.lib.scale import sharding

    path = tmp_path / "s.h5"
    codes = {"pooled": np.arange(6, dtype=np.float16).reshape(2, 3)}
    sharding.write_shard(path, "abc", ["k0", "k1"], codes, [(2, "bad.png: cannot read")])
    keys, got, bad = read_shard(path, "abc")
    assert keys == ["k0", "k1"] and bad == [(2, "bad.png: cannot read")]
    np.testing.assert_array_equal(got["pooled"], codes["pooled"])
    with pytest.raises(TlflowError, match="a shard of another extractor"):
        read_shard(path, "other")
    path.write_bytes(b"torn")
    with pytest.raises(TlflowError, match="not a readable shard file"):
        read_shard(path, "abc")
    assert sharding.shard_name("abc", ["k0", "k1"]) == sharding.shard_name("abc", ["k0", "k1"])
    assert sharding.shard_name("abc", ["k0", "k1"]) != sharding.shard_name("abd", ["k0", "k1"])
    monkeypatch.setattr(sharding, "CONNECT_TIMEOUT_S", 1.0)
    params = _project(tmp_path / "p", images, **SHARDED,
                      dask_address=f"tcp://127.0.0.1:{_free_port()}")
    with pytest.raises(TlflowError, match=r"extract.dask_address: no Dask scheduler answers"):
        extract.run(params)


def test_a_shard_of_unreadable_images_only_is_a_record_not_a_failure(tmp_path: Path):
    """compute_shard called directly (as a worker calls it): the unreadable image comes back
    in the record, the shard file holds no rows but every layer, and a second call finds it."""
    import torch

    from tlflow.tasks.lib.core.params import Extract
    from tlflow.tasks.lib.features.backbones import create_backbone
    from tlflow.tasks.lib.features.extraction import describe_extractor
    from tlflow.tasks.lib.features.store import extractor_id, library_versions
    from tlflow.tasks.lib.scale.sharding import ShardJob, compute_shard

    cfg = Extract(**{**TINY, "layers": ("pooled", "blocks.2")})
    backbone = create_backbone(cfg.backbone, cfg.weights, None, 0)
    backbone.resize(32)
    ext_id = extractor_id(describe_extractor(backbone.identity(), cfg, torch.device("cpu")))
    (tmp_path / "empty.png").write_bytes(b"")
    job = ShardJob(ext_id, cfg, 0, 32, library_versions(), (str(tmp_path / "empty.png"),),
                   ("k0",), str(tmp_path / "s.h5"))
    done = compute_shard(job)
    assert done.rows == 0 and not done.reused
    assert [(i, "empty.png: cannot read image" in r) for i, r in done.bad] == [(0, True)]
    keys, codes, _ = read_shard(tmp_path / "s.h5", ext_id)
    assert keys == [] and {k: v.shape for k, v in codes.items()} == {
        "pooled": (0, 1280), "blocks.2": (0, 40)}
    assert compute_shard(job).reused
