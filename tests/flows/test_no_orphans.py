"""Nothing outlives a run: Prefect's temporary server dies with the process that started it,
even when that process is killed with SIGKILL (no atexit hook runs then)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, cli_env, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

BOUND = """
import sys, time
from tlflow.flows.tempserver import spawn_bound
spawn_bound([sys.executable, "-c", "import time; time.sleep(600)"])
print("started", flush=True)
time.sleep(600)
"""

SERVER = """
import time
from tlflow.flows.tempserver import prefect_api
with prefect_api() as url:
    print(url, flush=True)
    time.sleep(600)
"""


def _kill_and_check(code: str, env: dict[str, str]) -> tuple[str, set[int]]:
    """Start `code` in a child, read its first line, SIGKILL it: every process it started dies
    with it. Returns the line and the pids of the processes it started."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        born = psutil.Process(proc.pid).children(recursive=True)
        assert born, line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in born)

    wait_for(gone, 120, "the processes it started to die with it")
    return line, {p.pid for p in born}


def test_a_bound_process_dies_with_its_killed_parent():
    _kill_and_check(BOUND, dict(os.environ))


@pytest.mark.faults  # a killed run: `make faults` (a temporary Prefect server starts: 10-40 s)
def test_the_temporary_server_dies_with_a_killed_run(tmp_path: Path):
    url, born = _kill_and_check(SERVER, cli_env(tmp_path))  # no PREFECT_API_URL
    assert url.startswith("http://127.0.0.1:"), url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # none of its processes listens there still (another test's server may have the port now)
    assert not any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   and c.pid in born for c in psutil.net_connections("tcp"))
