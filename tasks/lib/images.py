"""Image files: which names are images, and the one decoding function every stage uses.

extract, fine-tuning, evaluate and predict all decode through `read_image`, so a change here
reruns all of them (their code deps in dvc.yaml are derived from their imports), and
`DECODING` names the rules inside the extractor id.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.lib.errors import TlflowError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DECODING = "pil-rgb/1"  # the decoding rules' version, part of the extractor id


def decode(path: Path) -> Image.Image:
    """The file as an RGB image (Pillow). Raises whatever Pillow raises."""
    with Image.open(path) as img:
        return img.convert("RGB")


def read_image(path: Path, transform: Callable[[Image.Image], Any]) -> Any:
    """Decode and preprocess one file; any failure is a TlflowError naming file and reason.

    Pillow's decompression-bomb warning (a header declaring a huge size) counts as a failure.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return transform(decode(path))
    except Exception as err:
        raise TlflowError(f"{path}: cannot read image: {_reason(path, err)}") from None


def _reason(path: Path, err: Exception) -> str:
    if path.is_file() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb ({err})"
    return f"{type(err).__name__}: {err}"


def image_files(target: Path) -> list[Path]:
    """The image itself, or every image under a folder (sorted)."""
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise TlflowError(f"{target}: no such image or folder")
    files = sorted(p for p in target.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TlflowError(f"{target}: holds no images")
    return files
