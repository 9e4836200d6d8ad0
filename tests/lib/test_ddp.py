"""The ranks' collectives on two real gloo processes under torchrun, and the stage's reading
of a failure.

Run as a module (`python -m tests.lib.test_ddp JOB_DIR`), this file is a rank of the
launches below: the real tlflow.tasks.lib.scale.torchrun.launch and ddp.worker, with a test body
instead of fine-tuning, so that a launch costs torchrun's start and not the network's.
"""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import write_json
from tlflow.tasks.lib.core.params import Finetune, parse_params
from tlflow.tasks.lib.scale import ddp, torchrun

ROOT = Path(__file__).resolve().parents[2]


def _collectives(out: Path) -> dict:
    """Each collective once and the weights check twice (the same weights, then rank 1's
    nudged by 1e-6); what this rank saw goes to out/rank-<r>.json."""
    rank = dist.get_rank()
    seen: dict = {"ranks": list(ddp.current().__dict__.values())}
    seen["sum"] = ddp.all_sum([rank + 0.5, 1])
    rows = torch.tensor([[i, 10 * i] for i in ddp.shard(5)], dtype=torch.float32)
    seen["gathered"] = ddp.gather_shards(rows).tolist()  # rank 0: 0, 2, 4; 1: 1, 3
    seen["json"] = ddp.broadcast_json({"from": rank} if rank == 0 else None)
    seen["bytes"] = ddp.broadcast_bytes(b"\x00\xff" * 3 if rank == 0 else None).hex()
    torch.manual_seed(rank)  # different starts: DDP's constructor sends rank 0's weights
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model = model.to(memory_format=torch.channels_last)
    model[1].running_mean.fill_(rank)  # a buffer each rank moved on its own (bn: train)
    ddp.wrap(model, torch.device("cpu"))
    ddp.broadcast_buffers(model)
    seen["digest"] = ddp.check_same_weights(model, 1)
    with torch.no_grad():
        if rank == 1:
            model[0].weight[0, 0, 0, 0] += 1e-6
    try:
        ddp.check_same_weights(model, 2)
        seen["diverged"] = None
    except ddp.WeightsDiverged as err:
        seen["diverged"] = str(err)
    (out / f"rank-{rank}.json").write_text(json.dumps(seen))
    return {"world": dist.get_world_size()}


def _test_rank(job: dict) -> dict:
    """A rank's body: join the group; then the collectives, or rank 1 SIGKILLs itself while
    rank 0 waits for it in a collective."""
    dist.init_process_group("gloo")
    if job["act"] == "die" and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if job["act"] == "die":
        dist.barrier()
    return _collectives(Path(job["out"]))


def _launch(act: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict | None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)  # the ranks work here: _left finds them by it
    return torchrun.launch("tests.lib.test_ddp", {"act": act, "out": str(tmp_path)},
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


def test_two_gloo_ranks_share_sum_gather_and_catch_diverging_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert _launch("collectives", tmp_path, monkeypatch) == {"world": 2}  # rank 0's answer
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [s["ranks"] for s in seen] == [[0, 2, 0, True], [1, 2, 1, True]]
    for s in seen:
        assert s["sum"] == [2.0, 2.0]
        assert s["gathered"] == [[float(i), 10.0 * i] for i in range(5)]  # in item order
        assert s["json"] == {"from": 0} and s["bytes"] == "00ff00ff00ff"
        # every rank stops, naming the odd one
        assert "after epoch 2, rank(s) [1] hold other weights than rank 0" in s["diverged"]
    assert seen[0]["digest"] == seen[1]["digest"]  # rank 0's weights and buffers everywhere
    assert not _left(tmp_path)


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


@pytest.mark.parametrize(("error", "kind", "code"), [
    (TlflowError("finetune.n_blocks: 6, but x has 5 blocks"), "input", 2),
    (ValueError("a bug"), "crash", 1),
    (RuntimeError("[pair.cc:545] Read error: Connection reset by peer"), "peer", 1),
])
def test_a_rank_records_how_it_failed(tmp_path: Path, error, kind, code):
    """ddp.worker in this process (no process group): the record the stage reads."""
    write_json(tmp_path / torchrun.JOB, {})

    def body(job: dict) -> dict:
        raise error

    assert ddp.worker(tmp_path, body) == code
    record = json.loads((tmp_path / "rank-0.json").read_text())
    assert record["kind"] == kind and record["rank"] == 0
    assert record["message"].endswith(str(error)) and "Traceback" in record["traceback"]
    assert not (tmp_path / torchrun.RESULT).exists()
    assert ddp.worker(tmp_path, lambda job: {"ok": True}) == 0
    assert json.loads((tmp_path / torchrun.RESULT).read_text()) == {"ok": True}


def test_the_digest_covers_every_weight_and_not_the_memory_format():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    digest = ddp.weights_digest(model)
    assert ddp.weights_digest(model.to(memory_format=torch.channels_last)) == digest
    model[1].running_var[0] += 1
    assert ddp.weights_digest(model) != digest
    assert ddp.current() == ddp.Ranks()  # no process group: one process
    assert ddp.share(7) == 7 and list(ddp.shard(3)) == [0, 1, 2]


def test_torchrun_is_standalone_on_one_machine_and_meets_at_the_endpoint_on_several():
    one = torchrun.torchrun_args(Finetune(nproc_per_node=4), "abc")
    assert one == ["--nproc-per-node", "4", "--max-restarts", "0", "--standalone"]
    several = Finetune(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29400")
    assert torchrun.torchrun_args(several, "abc")[-8:] == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400",
        "--rdzv-id", "abc"]
    assert torchrun.world_size(several) == 16


@pytest.mark.parametrize(("finetune", "needle"), [
    ({"nnodes": 2}, "finetune.rdzv_endpoint: nnodes is 2: name the rendezvous host:port"),
    ({"rdzv_endpoint": "node0:29400"}, "finetune.rdzv_endpoint: only with nnodes > 1"),
])
def test_the_rendezvous_must_fit_the_number_of_machines(tmp_path: Path, finetune, needle):
    from tests.conftest import make_params  # here: the ranks import this module, not dvc

    raw = make_params(tmp_path).model_dump(mode="json")
    raw["finetune"].update(finetune)
    with pytest.raises(TlflowError, match=needle) as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


# torchrun's own report when a rank is SIGKILLed and it then stops the other (torch 2.x)
_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 18825)  (SIGTERM)
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 18826)
"""


def test_a_failure_is_one_line_naming_the_cause_and_what_a_rerun_does(tmp_path: Path):
    jobs, ckpt = tmp_path / "job", tmp_path / "ckpt"
    jobs.mkdir()
    killed = torchrun.failure(jobs, _REPORT, 1, 2, ckpt)
    assert isinstance(killed, torchrun.RankFailed) and str(killed) == (
        "finetune: rank 1 of 2 died (SIGKILL); no epoch was committed: a rerun starts afresh")
    write_json(ckpt / "all" / "state.json", {"epoch": 3, "tensors": "epoch-0003.safetensors"})
    (ckpt / "all" / "epoch-0003.safetensors").write_bytes(b"")  # the second phase's
    write_json(jobs / "rank-0.json", {"rank": 0, "kind": "peer", "message": "DistBackendError: "
                                      "Connection closed by peer", "traceback": ""})
    write_json(jobs / "rank-1.json", {"rank": 1, "kind": "crash", "message": "ValueError: x",
                                      "traceback": "..."})
    crashed = torchrun.failure(jobs, "", 1, 2, ckpt)  # the cause, not its consequence
    assert str(crashed) == (f"finetune: rank 1 of 2 failed: ValueError: x (traceback: "
                            f"{jobs / 'rank-1.json'}); the checkpoint after epoch 3 stays in "
                            f"{ckpt / 'all'}: a rerun resumes from it")
    write_json(jobs / "rank-1.json", {"rank": 1, "kind": "input", "message": "finetune.n_blocks:"
                                      " 6, but x has 5 blocks", "traceback": ""})
    bad = torchrun.failure(jobs, _REPORT, 1, 2, ckpt)  # bad input: as on one process, exit 2
    assert type(bad) is TlflowError and str(bad) == "finetune.n_blocks: 6, but x has 5 blocks"


if __name__ == "__main__":  # a rank of the launches above
    ddp.die_with_parent()
    os._exit(ddp.worker(Path(sys.argv[1]), _test_rank))
