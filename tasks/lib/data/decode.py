"""Image files: which names are images, and the one decoding function every stage uses.

extract, fine-tuning, evaluate and predict all decode through `read_image`, so a change here
reruns all of them (their code deps in dvc.yaml are derived from their imports), and
`DECODING` names the rules inside the extractor id: bump it whenever `decode` changes.

The rules (`decode`): an image is what a viewer shows.

- Orientation: the EXIF Orientation tag is applied (`ImageOps.exif_transpose`), as phone
  cameras expect; HEIC/HEIF rotations are applied by the plugin (pillow-heif).
- Frames: animated and multi-page files (GIF, APNG, WebP, multi-page TIFF) give their first
  frame, the one a viewer shows before it plays or pages.
- Depth: single-channel modes deeper than 8 bits (`I;16*`, 32-bit `I`, float `F`) are
  stretched linearly from the image's own minimum to its maximum onto 0..255 (ImageJ's and
  most scientific viewers' display; a 12-bit scan in a 16-bit container fills the range
  instead of turning almost black, and nothing saturates to white). NaN and infinite pixels
  are left out of the range and shown as 0. A constant image has no range: it stays
  constant, at its level in the mode's nominal range (16 and 32-bit integers: 0..65535,
  floats: 0..1), clipped to 0..255.
- Transparency (an alpha band, `LA`, `PA`, `RGBA`, or a palette / grayscale / RGB image
  with a transparent colour) is composited over the fixed background `BACKGROUND` (white):
  the model never sees the colours hidden under transparent pixels.
- Colour: palette images go through their palette; CMYK goes through its embedded ICC
  profile to sRGB when it has one (as colour-managed viewers do), else Pillow's conversion
  (which already undoes Adobe's inverted CMYK JPEGs); everything ends as 8-bit RGB.
- Formats: everything Pillow reads, AVIF included (Pillow >= 11.3 wheels), and HEIC/HEIF
  through `pillow-heif`. When a format's decoder is missing, the file is named with the
  package that reads it, never silently dropped.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps, JpegImagePlugin, features

from tlflow.tasks.lib.core.errors import TlflowError

try:  # HEIC/HEIF, the format iPhones write; registered once, for every stage
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF = True
except ImportError:  # pragma: no cover - pillow-heif is a dependency
    _HEIF = False

DECODING = "viewer/2"  # the decoding rules' version, part of the extractor id
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over

# Formats read only with a decoder that may be absent: suffix -> (available, what reads it).
_OPTIONAL = {
    ".heic": (_HEIF, "pillow-heif"),
    ".heif": (_HEIF, "pillow-heif"),
    ".avif": (bool(features.check("avif")), "Pillow >= 11.3 built with libavif"),
}
_NOMINAL_MAX = {"F": 1.0}  # a constant image's level: value / nominal max (default 65535)


def decode(path: Path, min_side: int | None = None) -> Image.Image:
    """The file as the 8-bit RGB image a viewer shows (see the module's rules).

    With `min_side` (pixels), a JPEG whose shorter side is at least twice that is decoded at
    the smallest DCT scale (1/2, 1/4 or 1/8: libjpeg's scaled decoding, Pillow's
    `Image.draft`) that keeps its shorter side at least `min_side`: a 12-megapixel photo
    headed for a 256 px resize costs about a tenth of a full decode. Orientation, colour and
    the resize that follows are unchanged. Raises whatever Pillow raises; `read_image` turns
    that into one line naming the file.
    """
    with Image.open(path) as img:
        img.seek(0)  # the first frame of an animation or a multi-page file
        if min_side is not None:
            draft(img, min_side)
        return to_rgb(ImageOps.exif_transpose(img))


def draft(img: Image.Image, min_side: int) -> None:
    """Ask a JPEG's decoder for the smallest DCT scale whose shorter side is >= min_side;
    other formats, and JPEGs under twice min_side, are left as they are."""
    w, h = img.size
    short = min(w, h)
    if not isinstance(img, JpegImagePlugin.JpegImageFile) or short < 2 * min_side:
        return  # JPEG and its MPO variant (phones' multi-picture files) decode scaled
    # draft() picks the largest scale with both sides >= the requested ones
    img.draft(img.mode, (-(-w * min_side // short), -(-h * min_side // short)))


def to_rgb(img: Image.Image) -> Image.Image:
    """An image in any Pillow mode as 8-bit RGB: depth stretched, transparency composited,
    palette and CMYK converted (EXIF orientation and frames are `decode`'s part)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _stretch(img).convert("RGB")
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    if _transparent(img):
        rgba = img.convert("RGBA")  # also applies a palette's or a colour key's transparency
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return img.convert("RGB")


def _transparent(img: Image.Image) -> bool:
    """Whether an image has an alpha band, a transparent colour or a palette with alpha."""
    bands = img.getbands()
    rgba_palette = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    return "A" in bands or "a" in bands or "transparency" in img.info or rgba_palette


def _stretch(img: Image.Image) -> Image.Image:
    """A deep single-channel image as mode L, its own min..max mapped onto 0..255."""
    a = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return Image.new("L", img.size, 0)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi > lo:
        out = (np.where(finite, a, lo) - lo) * (255.0 / (hi - lo))
    else:  # constant: keep its level in the mode's nominal range
        out = np.full(a.shape, lo * 255.0 / _NOMINAL_MAX.get(img.mode, 65535.0))
    out = np.where(finite, out, 0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))  # 2-D uint8: L


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile to sRGB, else Pillow's conversion."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):  # a broken profile: as if there were none
            pass
    return img.convert("RGB")


def read_image(path: Path, transform: Callable[[Image.Image], Any],
               min_side: int | None = None) -> Any:
    """Decode (scaled to `min_side`, see `decode`) and preprocess one file; any failure is a
    TlflowError naming file and reason.

    Pillow's decompression-bomb warning (a header declaring a huge size) counts as a failure.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return transform(decode(path, min_side))
    except Exception as err:
        raise TlflowError(f"{path}: cannot read image: {_reason(path, err)}") from None


def _reason(path: Path, err: Exception) -> str:
    if path.is_file() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    available, reader = _OPTIONAL.get(path.suffix.lower(), (True, ""))
    if not available:
        return f"{path.suffix} files need {reader}, which is not installed"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb ({err})"
    return f"{type(err).__name__}: {err}"


SIZE_SAMPLE = 256  # train images whose size `input_size_for` looks at, at most
TINY_FACTOR = 8  # images whose shorter side is under model size / 8 count as tiny


def input_size_for(setting: str | int | None, model_size: int,
                   files: list[Path]) -> tuple[int, str]:
    """The network's input size in pixels for `extract.image_size`, and why.

    A number is taken as given and null is the model's own size. `auto` is the model's own
    size (pretrained networks see their training size best: hymenoptera's photos at 224 px),
    unless the images are tiny: when the median shorter side of `files` (a sample) is under
    model_size / TINY_FACTOR, upsampling them to 224 px only costs time, and they get
    TINY_FACTOR times their side, rounded up to a multiple of 32 (sklearn's 8 px digits: 64).
    Reads only the files' headers.
    """
    if isinstance(setting, int):
        return setting, f"extract.image_size: {setting}"
    if setting is None:
        return model_size, "the model's own input size (extract.image_size: null)"
    sides = []
    for f in files[:SIZE_SAMPLE]:
        try:
            with Image.open(f) as img:
                sides.append(min(img.size))
        except Exception:
            continue
    if not sides:
        return model_size, "auto: the model's own input size (no readable image to measure)"
    side = sorted(sides)[len(sides) // 2]
    if side * TINY_FACTOR >= model_size:
        return model_size, f"auto: the model's own input size (images' median side {side} px)"
    size = max(32, -(-side * TINY_FACTOR // 32) * 32)
    return size, (f"auto: the images are tiny (median side {side} px < {model_size} / "
                  f"{TINY_FACTOR}), so {TINY_FACTOR} x {side} rounded up to a multiple of 32")
