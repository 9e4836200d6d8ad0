"""SIGINT and SIGTERM for the long commands (run, stage, serve, predict, features verify).

The first signal raises `Interrupted` in the main thread at the next bytecode: every safe
point of tlflow's outputs already holds there, because they are built to survive SIGKILL
(outputs are replaced atomically, a feature store trusts only committed rows, a checkpoint
is written whole), and the work in hand never waits more than one forward pass or one
training step (a few seconds on a CPU) before Python runs the handler. Context managers
unwind on the way out: the DataLoader's workers, Dask's LocalCluster, torchrun and the
temporary Prefect server are stopped by the code that started them. The command then prints
one line (`interrupted: extract stopped after 96 of 398 images; the last good outputs are
kept`) and exits 128 + the signal: 130 for SIGINT, 143 for SIGTERM.

A second signal exits at once (`os._exit`), after SIGKILLing the processes this one started
(its descendants, read from /proc): nothing is left behind, and no traceback is printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the signals seen, first first
_doing: list[str] = []  # what is in hand: the stage (or command) running now
_holding: list[None] = []  # one entry per write in hand that must not be cut (see `held`)


class Interrupted(KeyboardInterrupt):
    """Raised by the first SIGINT or SIGTERM (a KeyboardInterrupt, so Prefect records it as
    "aborted by an interrupt signal" and nothing catching Exception swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a command killed by it."""
        return 128 + self.signum


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (main thread only) as described above."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def received() -> int | None:
    """The first signal received, or None."""
    return _received[0] if _received else None


def doing(what: str) -> None:
    """Record what is in hand (a stage's name) for the interrupted line."""
    _doing[:] = [what]


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold a first signal off for the block, a write that is not atomic and so no safe
    point (DVC rewrites dvc.lock in place: cut half-way, the next run finds it invalid);
    raised as Interrupted when the block is done. A second signal still exits at once."""
    _holding.append(None)
    try:
        yield
    finally:
        _holding.pop()
    check()


def check() -> None:
    """A safe point: raise Interrupted if a signal came while it was held off elsewhere."""
    if _received:
        raise Interrupted(_received[0])


def _handler(signum: int, _frame: FrameType | None) -> None:
    if _received:  # the second one: out now
        _kill_descendants()
        sys.stderr.write(f"interrupted again ({signal.Signals(signum).name}): exiting at once\n")
        sys.stderr.flush()
        os._exit(128 + _received[0])
    _received.append(signum)
    if not _holding:
        raise Interrupted(signum)


def describe() -> str:
    """The one line printed on the way out."""
    from tlflow.tasks.lib.core.progress import last_progress

    where = _doing[0] if _doing else None
    p = last_progress()
    if p is not None and where and p.label.startswith(where) and 0 < p.done < p.total:
        what = f"{p.label.split(':')[0]} stopped after {p.done} of {p.total} images"
    elif where:
        what = f"{where} stopped"
    else:
        what = "stopped"
    return f"interrupted: {what}; the last good outputs are kept"


def _children(pid: int) -> Iterator[int]:
    """Every descendant of pid (Linux /proc), children before their children."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            yield kid
            yield from _children(kid)


def _kill_descendants() -> None:
    """SIGKILL the processes this one started (the temporary server, workers, ranks)."""
    for pid in list(_children(os.getpid())):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
