"""Resumable training state: tensors in safetensors, the rest in JSON, state.json committed
last; no pickle. (ftresume packs and restores, checkpoint writes and reads the files.)"""

from pathlib import Path

import torch

from tlflow.tasks.lib.core import checkpoint
from tlflow.tasks.lib.finetune.resume import pack, restore


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _save(directory: Path, epoch: int, model, opt, sched, meta: dict) -> None:
    checkpoint.save(directory, *pack(epoch, model, opt, sched, meta))


def test_round_trip_restores_model_optimizer_and_schedule(tmp_path: Path):
    model, opt, sched = _trained(0)
    _save(tmp_path, 2, model, opt, sched, {"best_file": None, "note": "x"})
    state = checkpoint.load_state(tmp_path)
    assert state["epoch"] == 2 and state["note"] == "x"
    other, other_opt, other_sched = _trained(1)
    restore(state, (tmp_path / state["tensors"]).read_bytes(), other, other_opt, other_sched)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other_sched.state_dict() == sched.state_dict()
    for mine, theirs in zip(opt.param_groups, other_opt.param_groups, strict=True):
        assert (mine["lr"], mine["weight_decay"]) == (theirs["lr"], theirs["weight_decay"])
    st, ot = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for idx in st:
        assert torch.equal(st[idx]["exp_avg"], ot[idx]["exp_avg"])


def test_state_json_is_the_commit_point(tmp_path: Path):
    model, opt, sched = _trained(0)
    assert checkpoint.load_state(tmp_path) is None
    _save(tmp_path, 1, model, opt, sched, {"best_file": None})
    _save(tmp_path, 2, model, opt, sched, {"best_file": None})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["epoch-0002.safetensors"]
    (tmp_path / "epoch-0002.safetensors").unlink()  # tensors gone: the state is not trusted
    assert checkpoint.load_state(tmp_path) is None
    (tmp_path / checkpoint.STATE).write_text("{half")
    assert checkpoint.load_state(tmp_path) is None


def test_the_files_hold_no_pickle(tmp_path: Path):
    model, opt, sched = _trained(0)
    _save(tmp_path, 1, model, opt, sched, {"best_file": None})
    for f in tmp_path.iterdir():
        assert b"\x80\x04" not in f.read_bytes()[:2]  # no pickle protocol header


def test_clearing_removes_only_what_tlflow_wrote(tmp_path: Path):
    """A checkpoint folder pointed at someone else's files keeps them."""
    model, opt, sched = _trained(0)
    (tmp_path / "all").mkdir()
    for d in (tmp_path, tmp_path / "all"):
        _save(d, 1, model, opt, sched, {"best_file": None})
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine.safetensors").write_bytes(b"x")
    checkpoint.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors", "notes.txt"]
    checkpoint.clear(tmp_path / "gone")  # nothing there: nothing to do
