"""The `tlflow` command. It works on the project in the current directory.

Conventions: data (predictions, JSON, tables, status) go to stdout, messages (notes,
progress, errors) to stderr; expected failures exit 2 with one line; `status -q` exits 1 when
a stage is stale; a closed pipe (`tlflow predict data/images | head -2`) ends quietly with
exit 141, the status of a command killed by SIGPIPE (128 + 13), as `cat` or `yes` give.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from tlflow import __version__
from tlflow.flows.commands import (
    advise,
    compare,
    deploy,
    export,
    features,
    history,
    init,
    plots,
    predict,
    promote,
    report,
    run,
    serve,
    stage,
    status,
)
from tlflow.flows.commands.base import Command
from tlflow.tasks.lib.core import interrupts
from tlflow.tasks.lib.core.errors import TlflowError

# Prefect warns at import when it cannot create PREFECT_HOME; a run that needs it says so in
# one line naming the variable and the fix (flows/tempserver.check_home)
warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory",
                        category=UserWarning)

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for `yes | head -1`'s yes

# The commands, in the order `tlflow --help` lists them: one module each in flows/commands/.
COMMANDS: tuple[Command, ...] = tuple(m.COMMAND for m in (
    init, run, status, history, serve, deploy, stage, predict, export, promote, report,
    compare, plots, advise, features))


def parser() -> argparse.ArgumentParser:
    """The `tlflow` parser, built from COMMANDS; the parsed arguments carry the chosen
    command's function as `func`."""
    head, _, tail = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="tlflow", description=head, epilog=tail)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, return its exit status. Expected failures (a TlflowError, a
    machine limit such as a full disk) print one line and return 2 (or their own status),
    without a traceback; an interrupt returns 128 + the signal."""
    args = parser().parse_args(argv)
    interrupts.install()
    # The temporary server Prefect starts for a run sends usage telemetry; offline (this
    # project's premise) each attempt logs an ERROR that makes a clean run look failed. A
    # user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        return _interrupted(err)
    except TlflowError as err:
        if interrupts.received() is not None:  # a child stopped by the same signal
            return _interrupted(err)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # the machine's limits (a full disk...): one line, else a bug
        from tlflow.tasks.lib.core.errors import environment_error

        if interrupts.received() is not None:  # e.g. a DataLoader worker killed by it
            return _interrupted(err)
        env = environment_error(err)
        if env is None:
            raise
        print(f"error: {env}", file=sys.stderr)
        return env.exit_code


def _interrupted(err: BaseException) -> int:
    """The one line of an interrupted command; 128 + the signal (130 for a plain
    KeyboardInterrupt)."""
    print(interrupts.describe(), file=sys.stderr, flush=True)
    signum = interrupts.received()
    return 128 + signum if signum is not None else 130


def console() -> None:
    """Console-script wrapper: exit with main's status. A reader that closes the pipe early
    (`| head`) ends the command quietly, as Python's documentation advises for SIGPIPE:
    stdout is pointed at devnull so the final flush cannot fail again, and the exit status is
    the shell's for a command killed by SIGPIPE."""
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


if __name__ == "__main__":
    console()
