"""Shared file helpers: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tlflow.tasks.lib.core.errors import environment_error

TEMP_PREFIX = ".tlflow-"  # atomic writes' temp files: .tlflow-XXXXXXXX.tmp beside the target
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; rename it onto `dest` only if the block succeeds.

    A killed writer leaves at most a stray `.tlflow-XXXXXXXX.tmp` file, never a half-written
    `dest`. The temp name is short and fixed in length, not derived from `dest`'s name: any
    name the file system allows (up to 255 bytes) stays writable.
    """
    dest = Path(dest)
    check_file_path(dest)  # before the work of the block, not at its rename
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=dest.parent)
    except OSError as err:  # a read-only folder, a full disk, a name too long
        raise environment_error(err, dest) or err from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, dest)
    except Exception as err:  # a full disk names the file being written, not the temp file
        env = environment_error(err, dest)
        if env is None or env is err:
            raise
        raise env from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def wrong_kind(path: Path, folder: bool = False) -> tuple[str, Path] | None:
    """What stands in the way of `path` being a file (or, with `folder`, a folder): ("is a
    folder", path), ("is a file", path) or ("under a file", the file above it); None when
    nothing does (absent paths are fine). Raises OSError when a folder cannot be searched."""
    path = Path(path)
    if folder and path.is_file():
        return "is a file", path
    if not folder and path.is_dir():
        return "is a folder", path
    above = next((a for a in path.parents if a.exists()), None)
    if above is not None and not above.is_dir():
        return "under a file", above
    return None


def check_file_path(dest: Path, what: str = "") -> None:
    """Refuse, in one line naming `what` (a key, an option) or the path, a file path that is
    an existing folder, or one under an existing file: a rename onto a folder fails only
    after the work, with IsADirectoryError. Raises TlflowError."""
    name = f"{what}: {dest}" if what else str(dest)
    try:
        wrong = wrong_kind(dest)
    except OSError as err:  # a folder above that cannot be searched (permission denied)
        raise environment_error(err, name) or err from None
    if wrong is None:
        return
    if wrong[0] == "is a folder":
        raise environment_error(OSError(errno.EISDIR, "Is a directory"), name)
    raise environment_error(OSError(errno.ENOTDIR, "Not a directory"),
                            f"{name} (its folder {wrong[1]} is a file)")


def write_text(dest: Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: Path, obj: object) -> None:
    """Write indented, key-sorted JSON atomically (the same object gives the same bytes)."""
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (hashlib.file_digest: no Python-level read loop)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()
