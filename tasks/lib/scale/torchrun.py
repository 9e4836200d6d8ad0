"""Fine-tuning on several processes, the stage's side: torchrun started and watched.

Above one process in all (finetune.nproc_per_node x nnodes), the finetune stage starts
`python -m torch.distributed.run ... -m tlflow.tasks.finetune JOB_DIR` (`launch`) and waits; each
rank runs tasks/lib/scale/ddp.py's `worker`. This module imports no torch: the stage's own
process only starts and watches.

A rank that fails ends the stage with one line (`RankFailed`, exit status 1) naming the rank
and the cause: a signal, or its exception (traceback kept in a file the line names). The last
committed checkpoint stays, and a rerun resumes from it. A bad input met by a rank is the same
one line, exit 2, as on one process. No process outlives the stage: torchrun receives SIGTERM
when the stage dies (Linux's parent-death signal; torchrun then stops its ranks), and each rank
SIGKILL when torchrun dies.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tlflow.tasks.lib.core import checkpoint
from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import write_json
from tlflow.tasks.lib.core.params import Finetune

JOB, RESULT = "job.json", "result.json"  # in the job folder: the work, rank 0's answer

# Started as `python -c _GUARD <stage pid> <python args...>`: ask Linux for SIGTERM when the
# stage dies (torchrun then stops its ranks), check the stage is still there, then become
# torchrun. A preexec_fn would do the same but is unsafe in a threaded parent (Prefect's).
_GUARD = """\
import os, signal, sys
from tlflow.tasks.lib.core.lifetime import die_with_parent
die_with_parent(signal.SIGTERM, int(sys.argv[1]))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


class RankFailed(TlflowError):
    """A rank died or raised: one line, exit status 1 (a crash, not bad input)."""

    exit_code = 1


def world_size(cfg: Finetune) -> int:
    """Processes in all: per machine x machines."""
    return cfg.nproc_per_node * cfg.nnodes


def torchrun_args(cfg: Finetune, run_id: str) -> list[str]:
    """torchrun's options: one machine rendezvous locally on a free port (--standalone);
    several meet at rdzv_endpoint (c10d) under a run id every machine derives alike."""
    args = ["--nproc-per-node", str(cfg.nproc_per_node), "--max-restarts", "0"]
    if cfg.nnodes == 1:
        return [*args, "--standalone"]
    return [*args, "--nnodes", str(cfg.nnodes), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", str(cfg.rdzv_endpoint), "--rdzv-id", run_id]


# torch's own log lines (torchrun's agent): "E1129 11:35:51.505000 18807 torch/...py:1002] ..."
_TORCH_LOG = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [^\]\s]+\] ")


class _Stderr:
    """Forwards the ranks' stderr (progress lines) and holds back torchrun's own report of a
    failure (its log lines and the ChildFailedError traceback): the stage says it in one line."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self._in_traceback = False

    def feed(self, line: str) -> None:
        if self._in_traceback or line.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
            self.held.append(line)
        elif _TORCH_LOG.match(line):
            self.held.append(line)
        else:
            print(line, end="", file=sys.stderr, flush=True)


def _pump(stream: IO[str], feed: Callable[[str], None]) -> None:
    for line in stream:
        feed(line)


def _exits(held: str) -> dict[int, int]:
    """rank -> exit code of each failure torchrun reports (negative: killed by that signal)."""
    pairs = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", held)
    return {int(rank): int(code) for rank, code in pairs}


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _checkpoint_note(checkpoints: Path) -> str:
    """What a rerun will do: resume from the last committed epoch, or start afresh."""
    for folder in (checkpoints / "all", checkpoints):
        state = checkpoint.load_state(folder)
        if state is not None:
            return (f"the checkpoint after epoch {state['epoch']} stays in {folder}: "
                    "a rerun resumes from it")
    return "no epoch was committed: a rerun starts afresh"


def failure(job_dir: Path, held: str, status: int, world: int,
            checkpoints: Path) -> TlflowError:
    """The one line for a torchrun that ended with `status`: a rank's bad input (exit 2, as
    on one process); else the cause, not its consequences: a rank killed by a signal, else a
    rank's own exception, before the broken connections the others then saw (RankFailed,
    exit 1)."""
    records = sorted((json.loads(p.read_text()) for p in job_dir.glob("rank-*.json")),
                     key=lambda e: e["rank"])
    inputs = [e for e in records if e["kind"] == "input"]
    if inputs:
        return TlflowError(inputs[0]["message"])
    exits = _exits(held)
    # torchrun stops the other ranks with SIGTERM once one fails: that is not the cause
    killed = [r for r, code in sorted(exits.items()) if code < 0 and -code != signal.SIGTERM]
    crashed = [e for e in records if e["kind"] == "crash"]  # not a peer's broken connection
    if killed:
        cause = f"rank {killed[0]} of {world} died ({_signal_name(exits[killed[0]])})"
    elif crashed or records:
        first = (crashed or records)[0]
        trace = job_dir / f"rank-{first['rank']}.json"
        cause = (f"rank {first['rank']} of {world} failed: {first['message']} "
                 f"(traceback: {trace})")
    elif exits:
        rank, code = min(exits.items())
        how = f"died ({_signal_name(code)})" if code < 0 else f"exited with status {code}"
        cause = f"rank {rank} of {world} {how}"
    else:
        sys.stderr.write(held)  # nothing recorded, nothing reported: torchrun's own words
        cause = f"torchrun ended with exit status {status}"
    return RankFailed(f"finetune: {cause}; {_checkpoint_note(checkpoints)}")


def launch(module: str, job: dict[str, Any], cfg: Finetune, run_id: str,
           checkpoints: Path) -> dict | None:
    """Run `python -m <module> JOB_DIR` on world_size(cfg) ranks under torchrun and wait.
    Returns rank 0's result, or None when rank 0 ran on another machine (which then holds
    the outputs). Raises TlflowError (a rank's bad input) or RankFailed (a rank died)."""
    job_dir = Path(tempfile.mkdtemp(prefix="tlflow-finetune-"))
    write_json(job_dir / JOB, job)
    cmd = ["-m", "torch.distributed.run", *torchrun_args(cfg, run_id), "-m", module,
           str(job_dir)]
    env = dict(os.environ)
    # each rank's threads: the machine's cores shared out (torchrun's own default is 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
    print(f"finetune: {world_size(cfg)} processes ({cfg.nproc_per_node} per machine x "
          f"{cfg.nnodes}) under torchrun: python {' '.join(cmd)}", flush=True)
    keep = False
    proc = subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, bufsize=1)
    try:
        err = _Stderr()
        pump = threading.Thread(target=contextvars.copy_context().run,
                                args=(_pump, proc.stderr, err.feed), daemon=True)
        pump.start()
        _pump(proc.stdout, lambda line: print(line, end="", flush=True))
        status = proc.wait()
        pump.join()
        if status == 0:
            sys.stderr.write("".join(err.held))  # a clean run's warnings, if any
            result = job_dir / RESULT
            return json.loads(result.read_text()) if result.is_file() else None
        error = failure(job_dir, "".join(err.held), status, world_size(cfg), checkpoints)
        keep = "traceback: " in str(error)
        raise error
    finally:
        if proc.poll() is None:  # interrupted: stop torchrun, which stops its ranks
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep:
            shutil.rmtree(job_dir, ignore_errors=True)
