"""The fine-tuning loop without a file: images from memory, checkpoints kept in a dict (the
ftresume.Checkpoints the shell would back with a folder). A run stopped after an epoch
resumes to the weights and curve of an uninterrupted one; another run's checkpoint is not
resumed. The real network (packaged weights) at 32 px, the head trains."""

import json

import pytest
import torch
from PIL import Image

from tests.lib.test_network import BACKBONE
from tlflow.tasks.lib.core.params import Finetune
from tlflow.tasks.lib.finetune.data import Images, train_augment
from tlflow.tasks.lib.finetune.loop import fine_tune, improves
from tlflow.tasks.lib.finetune.network import build, state_tensors
from tlflow.tasks.lib.finetune.resume import pack, resume

CLASSES = ("blue", "green", "red")
COLOURS = {"blue": (20, 30, 230), "green": (30, 220, 40), "red": (230, 40, 30)}


def test_ties_in_val_accuracy_go_to_the_lower_val_loss():
    assert improves(0.9, 0.5, 0.8, 0.1)
    assert improves(0.9, 0.3, 0.9, 0.4)
    assert not improves(0.9, 0.4, 0.9, 0.4 + 1e-6)  # noise is not progress
    assert not improves(0.8, 0.1, 0.9, 0.4)


class Stopped(Exception):
    """The run is killed before committing this epoch."""


class Memory:
    """Checkpoints in a dict, committed as JSON and safetensors bytes (as on disk)."""

    where = "memory"

    def __init__(self, stop_at: int | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self.committed: str | None = None
        self.fresh, self.stop_at = 0, stop_at

    def state(self):
        return None if self.committed is None else json.loads(self.committed)

    def read(self, name: str) -> bytes:
        return self.blobs[name]

    def start_afresh(self) -> None:
        self.fresh += 1
        self.blobs.clear()

    def commit(self, epoch, model, opt, sched, meta) -> None:
        from safetensors.torch import save

        if epoch == self.stop_at:
            raise Stopped
        tensors, state = pack(epoch, model, opt, sched, meta)
        self.blobs[f"epoch-{epoch}"] = save(tensors)
        self.committed = json.dumps({**state, "tensors": f"epoch-{epoch}"})

    def save_best(self, name: str, model) -> None:
        from safetensors.torch import save

        self.blobs[name] = save(state_tensors(model))


def _decode(item, transform):
    colour, shade = item
    return transform(Image.new("RGB", (40, 40), tuple(max(0, c - shade) for c in colour)))


def _run(checkpoints: Memory, fingerprint: str = "fp"):
    cfg = Finetune(enabled=True, trainable="head", epochs=2, batch_size=6, patience=2,
                   lr=3e-2, init_head="random")
    net = build(BACKBONE, "packaged", 32, 0, CLASSES)
    net.model.to(memory_format=torch.channels_last)  # as the shell does

    def images(shades, **augment):
        items = [(COLOURS[c], s) for c in CLASSES for s in shades]
        targets = [i for i, _ in enumerate(CLASSES) for _ in shades]
        return Images(items, targets, _decode, net.backbone.transform(), **augment)

    train = images((0, 10, 20, 30), augment=train_augment(net, cfg), seed=0)
    tuned = fine_tune(net, train, images((15,)), cfg, 0, torch.device("cpu"), fingerprint,
                      checkpoints)
    return tuned, net, cfg


def test_a_stopped_run_resumes_to_the_uninterrupted_weights_and_curve():
    whole, net, _ = _run(Memory())
    want = net.model.state_dict()
    assert [p["epoch"] for p in whole.curve] == [1, 2] and whole.calibration is not None

    stopped = Memory(stop_at=2)
    with pytest.raises(Stopped):
        _run(stopped)
    assert json.loads(stopped.committed)["epoch"] == 1 and stopped.fresh == 1
    stopped.stop_at = None
    resumed, net, cfg = _run(stopped)
    got = net.model.state_dict()
    assert stopped.fresh == 1  # resumed, not started afresh
    assert resumed.curve == whole.curve and resumed.best_epoch == whole.best_epoch
    for k in want:
        assert torch.equal(want[k], got[k]), k

    state, _, _ = resume(net, cfg, stopped, "other inputs", 2)  # not this run's: afresh
    assert state["epoch"] == 0 and stopped.fresh == 2
