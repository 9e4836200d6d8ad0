"""Fine-tuning on two CPU processes (torch DDP under torchrun, gloo): identical weights on
both ranks after every epoch; a killed stage leaves no process behind and the rerun resumes
to the weights of an uninterrupted run. Tiny colour images at 32 px, the head trains: each
launch costs mostly torchrun's and the ranks' start. (A dead rank, a rank's bad input and
the collectives: tests/lib/test_ddp.py, on cheaper launches.)"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, cli_env, colour_images, wait_for
from tlflow.tasks import extract, finetune, ingest, train
from tlflow.tasks.lib.core.params import load_params, params_under
from tlflow.tasks.lib.finetune.network import read_meta

EPOCHS = 5


def _params_file(root: Path, images: Path, **finetune_values) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ingest"].update(source="folder", path=str(images))
    raw["extract"].update(layers=["pooled"], image_size=32)
    raw["finetune"].update(enabled=True, trainable="head", epochs=EPOCHS, batch_size=4,
                           init_head="random", patience=EPOCHS, lr=3e-3, nproc_per_node=2,
                           **finetune_values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder (params.yaml with relative paths) ingested, extracted and trained."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = tmp / "whole"
    root.mkdir()
    _params_file(root, colour_images(tmp / "src"))
    params = params_under(root, root / "params.yaml")  # the same files, as absolute paths
    for stage in (ingest, extract, train):
        stage.run(params)
    return root


@pytest.fixture(scope="module")
def whole(project: Path) -> tuple[dict | None, str, str]:
    """The stage on two processes, uninterrupted, run in this process as the Prefect flow
    runs a stage (the ranks' lines come back through print): its result, stdout, stderr."""
    here, out, err = Path.cwd(), io.StringIO(), io.StringIO()
    os.chdir(project)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            meta = finetune.run(load_params())
    finally:
        os.chdir(here)
    return meta, out.getvalue(), err.getvalue()


def _stage(root: Path) -> subprocess.Popen:
    env = {**cli_env(root.parent), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tlflow", "stage", "finetune"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ours(root: Path) -> dict[int, tuple[str, str]]:
    """Processes working in `root` (torchrun and its ranks): pid -> (command line, RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(entry.name) == os.getpid() or Path(os.readlink(entry / "cwd")) != root:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in v)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found[int(entry.name)] = (cmd, env.get("RANK", ""))
    return found


def _none_left(root: Path) -> None:
    wait_for(lambda: not _ours(root), 300, "torchrun and its ranks to end")


def _wait_epoch(root: Path, above: int, proc: subprocess.Popen) -> int:
    """Poll (finely: an epoch takes a fraction of a second) until an epoch above `above` is
    committed; fail if the stage ends first."""
    deadline = time.monotonic() + 1200
    while (epoch := _epoch(root)) <= above:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch committed in 1200 s"
        time.sleep(0.02)
    return epoch


def _epoch(root: Path) -> int:
    try:
        return json.loads((root / ".tlflow/finetune/state.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _weights(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "models/finetuned.safetensors")


@pytest.mark.slow
def test_two_processes_hold_identical_weights_after_every_epoch(project: Path, whole):
    meta, out, err = whole
    assert meta is not None and meta.epochs_run == EPOCHS, out + err
    epochs = [line for line in out.splitlines() if line.startswith("finetune: epoch ")]
    assert len(epochs) == EPOCHS, out
    for line in epochs:  # every epoch, the ranks' digests were gathered and compared
        assert "weights identical on 2 ranks (sha256 " in line, line
    assert "Traceback" not in err and "torch/distributed" not in err, err
    assert "finetune: 2 processes (2 per machine x 1) under torchrun" in out
    assert read_meta(project / "models/finetuned").enabled
    assert len((project / "plots/finetune.csv").read_text().splitlines()) == EPOCHS + 1
    assert not (project / ".tlflow/finetune").exists()  # done: checkpoints cleared
    _none_left(project)


def _copy(project: Path, dest: Path) -> Path:
    """The project as ingest, extract and train left it."""
    return Path(shutil.copytree(project, dest, ignore=shutil.ignore_patterns(
        ".tlflow", "finetuned.*", "finetune.csv")))


@pytest.mark.faults  # make faults (CI), not make test
def test_a_killed_stage_leaves_no_process_and_the_rerun_resumes_to_the_same_weights(
        project: Path, whole, tmp_path: Path):
    """SIGKILL of `tlflow stage finetune` itself: torchrun and both ranks end with it (no
    orphan goes on writing checkpoints), and the rerun resumes from the last committed epoch
    to the weights and curve of the uninterrupted run. (A rank that dies alone:
    tests/lib/test_ddp.py.)"""
    assert whole[0] is not None, whole
    root = _copy(project, tmp_path / "killed")
    proc = _stage(root)
    kept = _wait_epoch(root, 0, proc)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=1800)
    _none_left(root)
    job = out.split(" -m tlflow.tasks.finetune ", 1)[1].split()[0]  # the killed stage left it
    shutil.rmtree(job)
    kept = _epoch(root)
    assert 1 <= kept < EPOCHS and not (root / "models/finetuned.safetensors").exists()

    proc = _stage(root)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out + err
    assert f"finetune: resuming after epoch {kept} from .tlflow/finetune" in out, out
    whole_weights, again = _weights(project), _weights(root)
    assert whole_weights.keys() == again.keys()
    assert all(whole_weights[k].equal(again[k]) for k in whole_weights)
    assert (root / "plots/finetune.csv").read_text() == (
        project / "plots/finetune.csv").read_text()
    _none_left(root)
