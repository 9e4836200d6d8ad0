"""The temporary Prefect server of a run that names no API, bound to the run's life.

With no `PREFECT_API_URL`, Prefect 3 starts a temporary server itself
(`prefect.server.api.server.SubprocessASGIServer`: `python -m uvicorn ... create_app`) and
stops it from an `atexit` hook. A `tlflow run` killed with SIGKILL (or SIGTERM, which skips
`atexit`) never runs that hook: the server (about 200 MB, listening on a port) lives on,
reparented to init. Prefect offers no hook into how it starts that process, so tlflow starts
the same server itself, with the same command and environment, asks the kernel to kill it
when the process that started it dies (Linux `prctl(PR_SET_PDEATHSIG)`), and points the run at
it for its duration. Elsewhere (not Linux) Prefect's own temporary server is used unchanged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tlflow.tasks.lib.core.lifetime import die_with_parent


def spawn_bound(args: list[str], **popen: object) -> subprocess.Popen:
    """Start a process that the kernel kills (SIGKILL) when this process dies (Linux)."""
    parent = os.getpid()
    return subprocess.Popen(args, preexec_fn=lambda: die_with_parent(signal.SIGKILL, parent),
                            **popen)


def spawn_server(args: list[str], **popen: object) -> subprocess.Popen:
    """spawn_bound, in a session of its own: a terminal's Ctrl-C (SIGINT to the whole
    foreground process group) and a SIGTERM to the group reach the run, never its API
    server, which must outlive the run long enough to record how it ended; the run stops it
    on the way out, and the kernel when the run dies."""
    return spawn_bound(args, start_new_session=True, **popen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(port: int) -> list[str]:
    """The command Prefect's SubprocessASGIServer runs (prefect 3.x), on `port`."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def _environment() -> dict[str, str]:
    """The environment Prefect gives its temporary server: no UI, ephemeral mode, and the
    settings of this process (PREFECT_HOME, so the same database)."""
    from prefect.settings import get_current_settings

    return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True)}


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    from tlflow.tasks.lib.core.errors import TlflowError

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TlflowError(f"the temporary Prefect server exited with {proc.returncode} "
                                  "before answering; set PREFECT_API_URL to a running server "
                                  "(`prefect server start`)")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
    raise TlflowError(f"the temporary Prefect server did not answer within {timeout:g} s "
                      "(3 x PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL "
                      "to a running server (`prefect server start`)")


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """A configured API that nothing answers at (refused, no such host, not HTTP, a timeout)
    is one line naming PREFECT_API_URL and the fix, at once: Prefect's client would retry
    for minutes and print pages of httpcore tracebacks. A server that answers at all (even
    503, which is transient) is left to Prefect's own retries."""
    import httpx

    from tlflow.tasks.lib.core.errors import TlflowError

    try:
        with httpx.Client() as client:
            reply = client.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except (httpx.HTTPError, ValueError) as err:
        raise TlflowError(f"PREFECT_API_URL: the Prefect API at {url} is unreachable "
                          f"({type(err).__name__}): start it with `prefect server start`, or "
                          "unset PREFECT_API_URL to use a temporary server") from None
    if reply.status_code == 404:
        raise TlflowError(f"PREFECT_API_URL: {url} answers but is not a Prefect API (GET "
                          "/health: 404); it usually ends in /api, e.g. "
                          "http://127.0.0.1:4200/api") from None


def check_home() -> None:
    """The temporary server keeps its database in PREFECT_HOME (default ~/.prefect): a home
    that cannot be written (a read-only HOME in a container or on a CI runner, a missing one)
    is one line naming the variable and the fix, at once; uvicorn would print pages of
    tracebacks that never name HOME."""
    from prefect.settings import PREFECT_HOME

    from tlflow.tasks.lib.core.errors import TlflowError

    home = Path(PREFECT_HOME.value()).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=home).close()
    except OSError as err:
        var = "PREFECT_HOME" if os.environ.get("PREFECT_HOME") else "HOME"
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise TlflowError(f"{var}: Prefect's home {home} cannot be written ({reason}): set "
                          "PREFECT_HOME to a writable folder (e.g. PREFECT_HOME=/tmp/prefect), "
                          "or PREFECT_API_URL to a running Prefect server") from None


def _drain() -> None:
    """Send what Prefect's log and event workers still queue (Prefect drains them at exit,
    when this server would be gone: "Error logging to API", and minutes of retries)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    from tlflow.tasks.lib.core import interrupts

    timeout = 1 if interrupts.received() is not None else 5  # interrupted: be quick
    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Run the block against a Prefect API: the configured one (`PREFECT_API_URL`, from the
    environment or the Prefect profile) as it is, else a temporary server that dies with this
    process; yields the temporary server's URL (None when none was started). Stopped on the
    way out (SIGTERM, then SIGKILL after 5 s)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        check_reachable(PREFECT_API_URL.value())
        yield None
        return
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or sys.platform != "linux":
        yield None
        return
    check_home()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    print(f"Starting a temporary Prefect server on {url} (it stops with this run)",
          file=sys.stderr, flush=True)
    proc = spawn_server(_command(port), env=_environment())
    try:
        # Prefect's own wait counts only its 0.1 s sleeps, not the polls between them; a first
        # start (the database's migrations) on a busy machine takes longer than the setting
        _wait_healthy(proc, url, 3 * PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain()  # the run's last logs and events reach the server before it stops
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
