"""The first signal's handling in-process: raised at once, or held off across a write that
is not atomic (DVC's dvc.lock) and raised when it is done."""

import os
import signal

import pytest

from tlflow.tasks.lib.core import interrupts


@pytest.fixture
def handled(monkeypatch):
    monkeypatch.setattr(interrupts, "_received", [])
    before = {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS}
    interrupts.install()
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_signal_inside_a_held_write_is_raised_when_the_write_is_done(handled):
    written = []
    with pytest.raises(interrupts.Interrupted) as err, interrupts.held():
        os.kill(os.getpid(), signal.SIGTERM)
        written.append("first half")
        written.append("second half")  # not cut half-way
    assert written == ["first half", "second half"]
    assert err.value.exit_code == 143


def test_a_signal_outside_a_held_write_is_raised_at_once(handled):
    done = []
    with pytest.raises(interrupts.Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after")  # the handler runs before the next bytecode
    assert done == []
