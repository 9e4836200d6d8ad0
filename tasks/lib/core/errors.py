"""The one exception type for expected failures (bad configuration, bad input, the machine's
limits), and the mapping of the machine's limits (a full disk, a read-only folder) to it."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class TlflowError(Exception):
    """An expected failure the user can fix; the CLI prints it and exits with code 2."""

    exit_code = 2


def handoff_error(path: Path, stage: str, problem: str = "not found") -> TlflowError:
    """A hand-off file one stage writes and another reads is missing or malformed: one line
    naming the file and the stage that writes it."""
    return TlflowError(f"{path}: {problem} (written by the {stage} stage: run "
                       f"`tlflow stage {stage}`, or `tlflow run`)")


# ---------------------------------------------------------------- the machine's limits

# errno -> (what is wrong, what to do): failures of the machine, not of the data, that a
# retry cannot fix. Each becomes one line naming the file (exit 2), never retried.
_ENVIRONMENT = {
    errno.ENOSPC: ("disk full", "free space on that disk and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota and rerun"),
    errno.EROFS: ("read-only file system", "point base.paths at a writable folder, or "
                  "remount it read-write"),
    errno.EACCES: ("permission denied", "give your user write access (chmod / chown) or "
                   "point base.paths elsewhere"),
    errno.EPERM: ("operation not permitted", "give your user write access (chmod / chown) "
                  "or point base.paths elsewhere"),
    errno.ENAMETOOLONG: ("file name too long", "shorten the path (most file systems allow "
                         "255 bytes per name)"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and rerun"),
    errno.EISDIR: ("a folder where a file goes", "remove or rename that folder, or name a "
                   "file path instead"),
    errno.ENOTDIR: ("a file where a folder goes", "remove or rename that file, or name "
                    "another path"),
}
# The same failures as other libraries word them (HDF5, safetensors' Rust I/O, SQLite), where
# the exception carries no errno.
_TEXTS = (
    (("No space left on device", "StorageFull", "errno = 28", "database or disk is full"),
     errno.ENOSPC),
    (("Disk quota exceeded", "QuotaExceeded", "errno = 122"), errno.EDQUOT),
    (("Read-only file system", "ReadOnlyFilesystem", "errno = 30",
      "attempt to write a readonly database"), errno.EROFS),
    (("Permission denied", "PermissionDenied", "errno = 13"), errno.EACCES),
    (("File name too long", "errno = 36"), errno.ENAMETOOLONG),
    (("Is a directory", "errno = 21"), errno.EISDIR),
    (("Not a directory", "errno = 20"), errno.ENOTDIR),
)


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind an exception or any exception it was raised from: its own, else one
    recognised in its text (libraries that lose the errno keep the OS's words)."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if isinstance(code, int) and code in _ENVIRONMENT:
            return code
        text = str(seen)
        for needles, code in _TEXTS:
            if any(n in text for n in needles):
                return code
        seen = seen.__cause__ or seen.__context__
    return None


def environment_error(exc: BaseException, path: Path | str | None = None
                      ) -> TlflowError | None:
    """The machine's limit behind `exc` (a full disk, a read-only folder, a name too long...)
    as one line naming the file (`path` when given, else the one the exception names), what
    is wrong and what to do; None when `exc` is not one. An exception that already is such a
    line (a TlflowError) is returned as it is.

    These are not transient: a retry would fail the same way (the flow never retries them).
    """
    if isinstance(exc, TlflowError):
        return exc
    code = _errno_of(exc)
    if code is None:
        return None
    what, todo = _ENVIRONMENT[code]
    where = str(path) if path is not None else _filename_of(exc)
    return TlflowError(f"{where + ': ' if where else ''}{what} ({os.strerror(code)}); {todo}")


def _filename_of(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        name = getattr(seen, "filename", None)
        if name:
            return os.fsdecode(name)
        seen = seen.__cause__ or seen.__context__
    return ""
