"""The ranks' collectives on two real gloo processes, and the stage's reading of a failure.

Run as a module (`python -m tests.lib.test_distributed JOB_DIR`), this file is a rank of the
torchrun launches below: tasks.lib.torchrun.launch and distributed.worker, with a test body
instead of fine-tuning (each launch then costs torchrun's start, not the network's).
"""

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tasks.lib import distributed, torchrun
from tasks.lib.errors import TlflowError
from tasks.lib.files import write_json
from tasks.lib.params import Finetune, parse_params

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo ranks: each collective once, and the weights check twice (the same
    weights, then rank 1's nudged); what it saw goes to out/rank-<r>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")
    try:
        seen: dict = {"ranks": list(distributed.current().__dict__.values())}
        seen["sum"] = distributed.all_sum([rank + 0.5, 1])
        shard = list(distributed.shard(5))  # rank 0: 0, 2, 4; rank 1: 1, 3
        rows = torch.tensor([[i, 10 * i] for i in shard], dtype=torch.float32)
        seen["gathered"] = distributed.gather_shards(rows).tolist()
        seen["json"] = distributed.broadcast_json({"from": rank} if rank == 0 else None)
        torch.manual_seed(rank)  # different starts: DDP's constructor sends rank 0's weights
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model = model.to(memory_format=torch.channels_last)
        model[1].running_mean.fill_(rank)  # a buffer a rank moved on its own
        distributed.wrap(model, torch.device("cpu"))
        distributed.broadcast_buffers(model)
        seen["digest"] = distributed.check_same_weights(model, 1)
        with torch.no_grad():
            if rank == 1:
                model[0].weight[0, 0, 0, 0] += 1e-6
        try:
            distributed.check_same_weights(model, 2)
            seen["diverged"] = None
        except distributed.WeightsDiverged as err:
            seen["diverged"] = str(err)
        Path(out, f"rank-{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_sum_gather_and_catch_diverging_weights(tmp_path: Path):
    mp.start_processes(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [s["ranks"] for s in seen] == [[0, 2, 0, True], [1, 2, 1, True]]
    assert seen[0]["sum"] == seen[1]["sum"] == [2.0, 2.0]
    want = [[float(i), 10.0 * i] for i in range(5)]  # back in item order, on every rank
    assert seen[0]["gathered"] == seen[1]["gathered"] == want
    assert seen[0]["json"] == seen[1]["json"] == {"from": 0}
    assert seen[0]["digest"] == seen[1]["digest"]  # rank 0's weights and buffers everywhere
    for s in seen:  # every rank stops, naming the odd one
        assert s["diverged"] and "after epoch 2, rank(s) [1] hold other weights" in s["diverged"]


def test_the_digest_covers_every_weight_and_not_the_memory_format():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    digest = distributed.weights_digest(model)
    assert distributed.weights_digest(model.to(memory_format=torch.channels_last)) == digest
    model[1].running_var[0] += 1
    assert distributed.weights_digest(model) != digest
    assert distributed.current() == distributed.Ranks()  # no process group: one process
    assert distributed.share(7) == 7 and list(distributed.shard(3)) == [0, 1, 2]


def test_torchrun_is_standalone_on_one_machine_and_meets_at_the_endpoint_on_several():
    one = torchrun.torchrun_args(Finetune(nproc_per_node=4), "abc")
    assert one == ["--nproc-per-node", "4", "--max-restarts", "0", "--standalone"]
    many = torchrun.torchrun_args(Finetune(nproc_per_node=8, nnodes=2,
                                           rdzv_endpoint="node0:29400"), "abc")
    assert many[-8:] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                         "node0:29400", "--rdzv-id", "abc"]
    assert torchrun.world_size(Finetune(nproc_per_node=8, nnodes=2,
                                        rdzv_endpoint="node0:29400")) == 16


@pytest.mark.parametrize(("finetune", "needle"), [
    ({"nnodes": 2}, "finetune.rdzv_endpoint: nnodes is 2: name the rendezvous host:port"),
    ({"rdzv_endpoint": "node0:29400"}, "finetune.rdzv_endpoint: only with nnodes > 1"),
])
def test_the_rendezvous_must_fit_the_number_of_machines(tmp_path: Path, finetune, needle):
    from tests.conftest import make_params  # here: the spawned ranks import this module

    raw = make_params(tmp_path).model_dump(mode="json")
    raw["finetune"].update(finetune)
    with pytest.raises(TlflowError, match=needle) as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


# torchrun's own report of a rank killed by SIGKILL, as torch 2.x prints it (abridged)
_KILLED = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_11:35:51
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 18826)
  error_file: <N/A>
"""


def test_a_failure_is_one_line_naming_the_rank_and_what_a_rerun_does(tmp_path: Path):
    jobs, ckpt = tmp_path / "job", tmp_path / "ckpt"
    jobs.mkdir()
    killed = torchrun.failure(jobs, _KILLED, 1, 2, ckpt)
    assert isinstance(killed, torchrun.RankFailed) and killed.exit_code == 1
    assert str(killed) == ("finetune: rank 1 of 2 died (SIGKILL); no epoch was committed: "
                           "a rerun starts afresh")
    write_json(ckpt / "state.json", {"epoch": 3, "tensors": "epoch-0003.safetensors"})
    (ckpt / "epoch-0003.safetensors").write_bytes(b"")
    write_json(jobs / "rank-0.json", {"rank": 0, "kind": "peer", "message": "DistBackendError: "
                                      "Connection closed by peer", "traceback": ""})
    write_json(jobs / "rank-1.json", {"rank": 1, "kind": "crash", "message": "ValueError: x",
                                      "traceback": "..."})
    crashed = torchrun.failure(jobs, "", 1, 2, ckpt)  # the cause, not its consequence
    assert str(crashed) == (f"finetune: rank 1 of 2 failed: ValueError: x (traceback: "
                            f"{jobs / 'rank-1.json'}); the checkpoint after epoch 3 stays in "
                            f"{ckpt}: a rerun resumes from it")
    write_json(jobs / "rank-1.json", {"rank": 1, "kind": "input", "message": "finetune.n_blocks:"
                                      " 6, but x has 5 blocks", "traceback": ""})
    bad = torchrun.failure(jobs, "", 1, 2, ckpt)  # bad input: as on one process, exit 2
    assert type(bad) is TlflowError and str(bad) == "finetune.n_blocks: 6, but x has 5 blocks"


def _test_rank(job: dict) -> dict:
    """A rank's body: join the group; then bad input on every rank, or rank 1 SIGKILLs
    itself while rank 0 waits for it in a collective, or both finish."""
    dist.init_process_group("gloo")
    if job["act"] == "input":
        raise TlflowError("finetune.n_blocks: 6, but the backbone has 5 blocks")
    if job["act"] == "die" and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return {"world": dist.get_world_size()}


def _launch(act: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict | None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)  # the ranks work here: _left finds them by it
    return torchrun.launch("tests.lib.test_distributed", {"act": act},
                           Finetune(nproc_per_node=2), act, tmp_path / "ckpt")


def _left(where: Path) -> list[int]:
    """Processes other than this one whose working folder is `where`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != os.getpid() and Path(
                    os.readlink(entry / "cwd")) == where:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_rank_that_dies_fails_the_launch_in_one_line_and_none_outlives_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture):
    write_json(tmp_path / "ckpt" / "state.json", {"epoch": 2, "tensors": "epoch-0002.x"})
    (tmp_path / "ckpt" / "epoch-0002.x").write_bytes(b"")  # what rank 0 committed before
    with pytest.raises(torchrun.RankFailed) as err:
        _launch("die", tmp_path, monkeypatch)
    assert str(err.value) == (f"finetune: rank 1 of 2 died (SIGKILL); the checkpoint after "
                              f"epoch 2 stays in {tmp_path / 'ckpt'}: a rerun resumes from it")
    assert err.value.exit_code == 1
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err and "ChildFailedError" not in printed.err, printed
    assert not _left(tmp_path)
    assert (tmp_path / "ckpt" / "state.json").is_file()  # the last good checkpoint stays


def test_a_ranks_bad_input_is_the_one_process_line_and_a_clean_run_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(TlflowError) as err:
        _launch("input", tmp_path, monkeypatch)
    assert type(err.value) is TlflowError and err.value.exit_code == 2
    assert str(err.value) == "finetune.n_blocks: 6, but the backbone has 5 blocks"
    assert _launch("ok", tmp_path, monkeypatch) == {"world": 2}  # rank 0's answer
    assert not _left(tmp_path)


if __name__ == "__main__":  # a rank of the launches above
    os._exit(distributed.worker(Path(sys.argv[1]), _test_rank))
