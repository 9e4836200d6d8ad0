"""Which folders are tlflow's: a marker file in each folder it writes its outputs into.

The folders tlflow fills and cleans up (the images snapshot, the feature stores, the
fine-tuning checkpoints) hold `.tlflow-owned`, a small JSON file naming the base.paths key
that made the folder. Before a stage writes into one of them, the folder must be new, empty,
marked, or hold only files tlflow recognises as its own (a folder written by a version of
tlflow without markers: the snapshot's files are all listed in the last manifest, the
features folder holds only stores and their locks, the checkpoint folder only checkpoint
files); then it is marked. Anything else is somebody else's folder, refused in one line
naming the key and the path before anything is written. Clean-ups never go by listing a
folder: each removes only what tlflow recorded (ingest: the last manifest's files; features:
rows of its own stores; fine-tuning: its own checkpoint files).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import TEMP_PREFIX, write_text

MARKER = ".tlflow-owned"
# the base.paths key of each folder tlflow owns -> the stage that writes into it
FOLDERS = {"images": "ingest", "features": "extract", "finetune_checkpoints": "finetune"}

_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"\w{8}\.tmp")
_STORE = re.compile(r"[0-9a-f]{16}\.h5(\.lock)?|current\.json")
_CHECKPOINT = re.compile(r"((\w+/)*)((epoch|best)-\d{4}\.safetensors|state\.json)")


def marked(folder: Path) -> bool:
    """Whether tlflow's marker is in the folder."""
    return (folder / MARKER).is_file()


def _files(folder: Path) -> list[str]:
    """Every file under the folder, relative posix paths, sorted (links are not followed)."""
    found = []
    for dirpath, _, names in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        found.extend((rel / n).as_posix() for n in names)
    return sorted(found)


def check(key: str, folder: Path, ours: Callable[[str], bool]) -> None:
    """Refuse, before anything is written, a folder for base.paths.<key> that holds files
    tlflow did not write: it is not a folder (a file is there), or it is unmarked and one of
    its files (relative posix path) is not `ours`. New, empty and marked folders pass."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        what = "a symlink" if folder.is_symlink() else "a file"
        raise TlflowError(f"base.paths.{key}: {folder} is {what}, not a folder tlflow made; "
                          "point it at a new folder")
    if not folder.is_dir() or marked(folder):
        return
    strangers = [f for f in _files(folder) if not (_TEMP.fullmatch(Path(f).name) or ours(f))]
    if strangers:
        raise TlflowError(
            f"base.paths.{key}: {folder} holds files tlflow did not write (e.g. "
            f"{strangers[0]}, {len(strangers)} in all) and no {MARKER} marker; nothing was "
            "written: point it at a new or empty folder, or move those files away")


def mark(key: str, folder: Path) -> None:
    """Create the folder if needed and put tlflow's marker in it (once; same bytes always)."""
    if marked(folder):
        return
    write_text(folder / MARKER, json.dumps({"key": f"base.paths.{key}", "tool": "tlflow"},
                                           sort_keys=True) + "\n")


def recognised(key: str, listed: set[str] = frozenset()) -> Callable[[str], bool]:
    """What a folder written by tlflow before markers held, per key: the snapshot's files are
    those the last manifest lists (`listed`); the features folder's are extractor stores
    (`<16 hex>.h5`), their locks and `current.json`; the checkpoints' are `state.json` and
    `epoch-NNNN` / `best-NNNN` tensors, in sub-folders too."""
    if key == "images":
        return lambda rel: rel in listed
    if key == "features":
        return lambda rel: _STORE.fullmatch(rel) is not None
    if key == "finetune_checkpoints":
        return lambda rel: _CHECKPOINT.fullmatch(rel) is not None
    raise ValueError(f"tlflow owns no folder base.paths.{key}")


def _listed(manifest: Path) -> set[str]:
    from tlflow.tasks.lib.data.manifest import read_manifest

    try:
        return {r.relpath for r in read_manifest(manifest)}
    except TlflowError:  # no manifest (yet), or a damaged one: nothing is recognised by it
        return set()


def check_outputs(stage: str, paths: object) -> None:
    """Before `stage` runs: each folder it writes into is new, empty, tlflow's (marked) or
    holds only tlflow's own files; else one line naming the key (see `check`)."""
    for key, writer in FOLDERS.items():
        if writer == stage:
            listed = _listed(paths.manifest) if key == "images" else set()  # type: ignore[attr-defined]
            check(key, getattr(paths, key), recognised(key, listed))


def mark_outputs(stage: str, paths: object) -> None:
    """After `stage` wrote: mark each folder it writes into that now exists."""
    for key, writer in FOLDERS.items():
        folder = getattr(paths, key)
        if writer == stage and folder.is_dir():
            mark(key, folder)
