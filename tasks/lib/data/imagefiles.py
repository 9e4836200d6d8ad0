"""Which files are images: suffixes, operating-system and archive litter, file names.

Kept apart from the decoder (tasks/lib/data/decode.py) so that ingest, which lists files but
never decodes them, does not rerun when the decoding rules change.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlflow.tasks.lib.core.errors import TlflowError

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".gif", ".webp", ".tif",
    ".tiff", ".heic", ".heif", ".avif",
})


# Operating-system and archive litter, matched on any part of a path (besides hidden names).
_METADATA_NAMES = frozenset({
    "__macosx", ".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r",
    "$recycle.bin", "system volume information",
})


def metadata_kind(relpath: str) -> str | None:
    """What OS / archive metadata a relative path is, or None for data.

    A path is metadata when any part of it is hidden (starts with '.': `.DS_Store`,
    `.ipynb_checkpoints/`, AppleDouble `._*` files) or is one of `__MACOSX`, `Thumbs.db`,
    `ehthumbs.db`, `desktop.ini`, `Icon\\r`, `$RECYCLE.BIN`, `System Volume Information`
    (any case). The kind is the name that matched (`._*` for every AppleDouble file).
    """
    for part in relpath.split("/"):
        if part.startswith("._"):
            return "._*"
        if part.lower() in _METADATA_NAMES or (part.startswith(".") and part.strip(".")):
            return part
    return None


def walk_files(folder: Path) -> list[str]:
    """Every file under a folder as a posix path relative to it, sorted; symlinked files are
    listed, symlinked folders below it are not entered (as `Path.rglob`)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        found.extend((rel / name).as_posix() for name in filenames
                     if (Path(dirpath) / name).is_file())
    return sorted(found)


def check_name(recorded: str, path: Path) -> None:
    """Refuse a file whose name (`recorded`, the part of `path` tlflow writes down) is not
    valid UTF-8, in one line naming the file.

    Python sees such a name only through surrogate escapes; the manifest, the stat cache and
    predict's output are UTF-8 text, and DVC stops with "unexpected error - 'utf-8' codec
    can't encode character" on it (tried: dvc 3 `dvc add`), so it cannot be versioned.
    Renaming it (e.g. `convmv -f latin1 -t utf-8 -r --notest FOLDER`) is the fix.
    """
    try:
        recorded.encode("utf-8")
    except UnicodeEncodeError:
        raise TlflowError(f"{os.fsencode(path)!r}: file name is not valid UTF-8; rename it "
                          "(e.g. convmv -f latin1 -t utf-8 -r --notest FOLDER)") from None


def image_files(target: Path) -> list[Path]:
    """The image itself, or every image under a folder (sorted), without OS metadata; a name
    that is not valid UTF-8 is refused (`check_name`)."""
    if target.is_file():
        check_name(str(target), target)
        return [target]
    if not target.is_dir():
        raise TlflowError(f"{target}: no such image or folder")
    files = [target / rel for rel in walk_files(target)
             if metadata_kind(rel) is None and Path(rel).suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise TlflowError(f"{target}: holds no images")
    for f in files:
        check_name(str(f), f)
    return files
