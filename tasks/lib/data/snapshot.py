"""The snapshot: the source's images hashed and mirrored under base.paths.images, copying
only what changed and removing only what tlflow put there (ingest's shell)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.core.files import atomic_path, sha256_bytes
from tlflow.tasks.lib.data.hashcache import HashCache
from tlflow.tasks.lib.data.sources import Item


def hash_items(items: list[Item], cache: HashCache) -> list[tuple[Item, str]]:
    """Each item with the sha256 of its bytes, read from the source (files whose stat the
    cache knows are not re-read): the manifest can be built, and refused, before anything
    under the snapshot changes."""
    return [(it, sha256_bytes(it.data) if it.data is not None else cache.sha256(it.src))
            for it in items]


def snapshot(hashed: list[tuple[Item, str]], images_dir: Path, cache: HashCache,
             written: set[str] = frozenset()) -> None:
    """Mirror the hashed items under images_dir, copying only what changed, then remove the
    files of `written` (what tlflow put there: the last manifest's relpaths) that the source no
    longer has; a file tlflow did not write is never removed. A copied file is hashed again: a
    source file that changed since `hash_items` read it is an error naming it."""
    for it, sha in hashed:
        dest = images_dir / it.relpath
        if it.data is not None:
            if not dest.is_file() or cache.sha256(dest) != sha:
                with atomic_path(dest) as tmp:
                    tmp.write_bytes(it.data)
        elif not _same_file(it.src, dest):
            with atomic_path(dest) as tmp:
                shutil.copy2(it.src, tmp)
            if cache.sha256(dest) != sha:
                raise TlflowError(f"{it.src}: changed while ingest copied it; run ingest again")
    _prune(images_dir, set(written) - {it.relpath for it, _ in hashed})


def _same_file(src: Path, dest: Path) -> bool:
    if not dest.is_file():
        return False
    a, b = src.stat(), dest.stat()  # copy2 keeps the source's mtime on the copy
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _prune(images_dir: Path, gone: set[str]) -> None:
    """Remove these snapshot files, then the folders their removal left empty."""
    for rel in sorted(gone):
        path = images_dir / rel
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != images_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
