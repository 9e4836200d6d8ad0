"""The one exception type for expected failures: bad configuration or bad input."""

from __future__ import annotations

from pathlib import Path


class TlflowError(Exception):
    """An expected failure the user can fix; the CLI prints it and exits with code 2."""

    exit_code = 2


def handoff_error(path: Path, stage: str, problem: str = "not found") -> TlflowError:
    """A hand-off file one stage writes and another reads is missing or malformed: one line
    naming the file and the stage that writes it."""
    return TlflowError(f"{path}: {problem} (written by the {stage} stage: run "
                       f"`tlflow stage {stage}`, or `tlflow run`)")
