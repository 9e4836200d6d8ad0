"""The one decoding function: an image is what a viewer shows (EXIF orientation, deep and
float modes stretched, transparency composited, first frames, CMYK and palettes, HEIC/AVIF).

Pixel rules are checked on exact values; the claims about codes go through the real packaged
backbone (EfficientNet-Lite0 at 32 px, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.data.decode import BACKGROUND, DECODING, decode, read_image
from tlflow.tasks.lib.data.imagefiles import IMAGE_SUFFIXES
from tlflow.tasks.lib.features.backbones import create_backbone
from tlflow.tasks.lib.features.codes import CodeExtractor

ORIENTATION = 0x0112


def photo(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    """An HxWx3 uint8 picture with structure (a bright bar on a noisy ground): orientation
    and colour both change its codes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    a[h // 4: h // 2, : w // 2] = (250, 240, 30)
    return a


@pytest.fixture(scope="module")
def codes():
    """codes(paths) -> (N, D) pooled codes through the real decoder and backbone."""
    backbone = create_backbone("timm/tf_efficientnet_lite0", "packaged", 32)
    extractor, transform = CodeExtractor(backbone, ("pooled",)), backbone.transform()

    def run(*paths: Path) -> np.ndarray:
        with torch.inference_mode():
            x = torch.stack([read_image(p, transform) for p in paths])
            return extractor(x)["pooled"].numpy()

    return run


def assert_same_codes(a: np.ndarray, b: np.ndarray) -> None:
    """Equal within what the float16 store keeps (3 significant digits)."""
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- bit depth


def test_16bit_png_codes_equal_its_8bit_rendering(tmp_path: Path, codes):
    grays = []
    for i in range(3):
        g = photo(i).mean(axis=2).astype(np.uint8)
        g[0, 0], g[0, 1] = 0, 255  # the full range: the 8-bit rendering is v16 / 257
        grays.append(g)
        Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / f"g{i}_16.png")
        Image.fromarray(g).save(tmp_path / f"g{i}_8.png")
    assert Image.open(tmp_path / "g0_16.png").mode == "I;16"
    for i, g in enumerate(grays):
        assert np.array_equal(np.asarray(decode(tmp_path / f"g{i}_16.png"))[..., 0], g)
    c16 = codes(*(tmp_path / f"g{i}_16.png" for i in range(3)))
    c8 = codes(*(tmp_path / f"g{i}_8.png" for i in range(3)))
    assert_same_codes(c16, c8)
    # not saturated: three different pictures keep three different codes
    assert min(np.abs(c16[i] - c16[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 0.05


def test_deep_modes_stretch_by_their_own_range(tmp_path: Path):
    ramp = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)  # 12-bit data, 16-bit file
    Image.fromarray(ramp).save(tmp_path / "twelve.png")
    out = np.asarray(decode(tmp_path / "twelve.png"))
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255  # not nearly black, not white
    expected = np.rint(ramp.astype(float) * 255 / ramp.max()).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)

    floats = np.linspace(-3.0, 5.0, 64, dtype=np.float32).reshape(8, 8)
    floats[0, 0] = np.nan
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    f = np.asarray(decode(tmp_path / "float.tif"))[..., 0]
    assert f[0, 0] == 0 and f[0, 1] == 0 and f[-1, -1] == 255  # NaN shown as 0, range min..max
    assert (np.diff(f.ravel()[1:].astype(int)) >= 0).all()

    wide = np.array([[-70000, 0], [70000, 140000]], dtype=np.int32)
    Image.fromarray(wide, mode="I").save(tmp_path / "int32.tif")
    assert np.asarray(decode(tmp_path / "int32.tif"))[..., 0].tolist() == [[0, 85], [170, 255]]


@pytest.mark.parametrize(("array", "level"), [
    (np.full((6, 6), 65535, np.uint16), 255),
    (np.full((6, 6), 0, np.uint16), 0),
    (np.full((6, 6), 128 * 257, np.uint16), 128),
    (np.full((6, 6), 0.5, np.float32), 128),
])
def test_a_constant_image_stays_constant(tmp_path: Path, array: np.ndarray, level: int):
    path = tmp_path / ("c.png" if array.dtype == np.uint16 else "c.tif")
    Image.fromarray(array).save(path)
    out = np.asarray(decode(path))
    assert (out == level).all()


# ---------------------------------------------------------------- orientation


def test_exif_rotated_jpeg_codes_equal_the_photo_saved_upright(tmp_path: Path, codes):
    upright = photo(7)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # the sensor's pixels, turned
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[ORIENTATION] = 6  # "rotate 90 CW to display", as phones write it
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as raw:  # the same decoded pixels, turned upright
        Image.fromarray(np.rot90(np.asarray(raw.convert("RGB")), -1)).save(tmp_path / "up.png")
    shown = np.asarray(decode(tmp_path / "phone.jpg"))
    assert shown.shape == upright.shape
    assert np.array_equal(shown, np.asarray(Image.open(tmp_path / "up.png")))
    c = codes(tmp_path / "phone.jpg", tmp_path / "up.png")
    assert_same_codes(c[0], c[1])
    with Image.open(tmp_path / "phone.jpg") as raw:  # and ignoring the tag would differ
        Image.fromarray(np.asarray(raw.convert("RGB"))).save(tmp_path / "ignored.png")
    assert np.abs(codes(tmp_path / "ignored.png")[0] - c[1]).max() > 0.05


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_shows_upright(tmp_path: Path, orientation: int):
    upright = Image.fromarray(photo(orientation))
    # the stored pixels are the upright picture under the inverse of the tag's transform
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(inverse[orientation]) if orientation > 1 else upright
    exif = stored.getexif()
    exif[ORIENTATION] = orientation
    stored.save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(np.asarray(decode(tmp_path / "o.png")), np.asarray(upright))


# ---------------------------------------------------------------- scaled JPEG decoding


def _big_photo(path: Path, w: int, h: int, orientation: int = 1, fmt: str = "JPEG") -> Path:
    im = Image.fromarray(photo(3, 40, 56)).resize((w, h), Image.BICUBIC)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    im.save(path, format=fmt, exif=exif, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize(("size", "min_side", "decoded"), [
    ((2100, 1500), 256, (525, 375)),  # 1/4: the smallest scale whose short side stays >= 256
    ((1200, 900), 256, (600, 450)),  # 1/2 (1/4 would be 225 px)
    ((4000, 3000), 256, (500, 375)),  # 1/8, a 12-megapixel photo
    ((600, 450), 256, (600, 450)),  # under twice the side: every pixel
])
def test_a_big_jpeg_decodes_at_the_smallest_scale_that_covers_the_resize(
        tmp_path: Path, size: tuple[int, int], min_side: int, decoded: tuple[int, int]):
    path = _big_photo(tmp_path / "big.jpg", *size)
    assert decode(path, min_side).size == decoded
    assert decode(path).size == size  # no min_side: every pixel


def test_scaled_decoding_keeps_orientation_and_leaves_other_formats(tmp_path: Path):
    turned = _big_photo(tmp_path / "phone.jpg", 1600, 1200, orientation=6)
    assert decode(turned, 200).size == (300, 400)  # 1/4, then turned upright
    png = _big_photo(tmp_path / "big.png", 1600, 1200, fmt="PNG")
    assert decode(png, 200).size == (1600, 1200)
    small = _big_photo(tmp_path / "small.jpg", 380, 300)  # bit for bit today's decode
    assert np.array_equal(np.asarray(decode(small, 200)), np.asarray(decode(small)))


def test_scaled_decoding_gives_nearly_the_codes_of_a_full_decode(tmp_path: Path, codes):
    """The network sees the same 32 px crop either way: libjpeg's scaled IDCT and the
    antialiased resize agree closely (the README states the figures on real photos)."""
    path = _big_photo(tmp_path / "big.jpg", 1600, 1200)
    backbone = create_backbone("timm/tf_efficientnet_lite0", "packaged", 32)
    transform, side = backbone.transform(), backbone.resize_side
    assert side == 37  # 32 / crop_pct 0.875, rounded up
    full, scaled = (read_image(path, transform, s) for s in (None, side))
    assert not torch.equal(full, scaled)
    extractor = CodeExtractor(backbone, ("pooled",))
    with torch.inference_mode():
        a, b = extractor(torch.stack([full, scaled]))["pooled"]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


# ---------------------------------------------------------------- transparency


def test_transparent_png_codes_equal_its_composite(tmp_path: Path, codes):
    rgb = photo(3)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[5:35, 10:45] = 255  # the cut-out
    alpha[5:35, 30:45] = 128  # a half-transparent edge
    cutout = Image.fromarray(np.dstack([rgb, alpha]))  # hidden pixels keep random colours
    cutout.save(tmp_path / "cutout.png")
    ground = Image.new("RGBA", cutout.size, (*BACKGROUND, 255))
    Image.alpha_composite(ground, cutout).convert("RGB").save(tmp_path / "composite.png")
    assert np.array_equal(np.asarray(decode(tmp_path / "cutout.png")),
                          np.asarray(Image.open(tmp_path / "composite.png")))
    c = codes(tmp_path / "cutout.png", tmp_path / "composite.png")
    assert_same_codes(c[0], c[1])
    # what lies under fully transparent pixels no longer matters
    hidden = np.dstack([photo(4), alpha])
    hidden[alpha > 0] = np.dstack([rgb, alpha])[alpha > 0]
    Image.fromarray(hidden).save(tmp_path / "other_hidden.png")
    assert np.array_equal(np.asarray(decode(tmp_path / "other_hidden.png")),
                          np.asarray(decode(tmp_path / "cutout.png")))


def test_every_kind_of_transparency_goes_over_the_background(tmp_path: Path):
    la = np.dstack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)])
    la[0, 0, 1] = 255
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = np.asarray(decode(tmp_path / "la.png"))
    assert out[0, 0].tolist() == [10, 10, 10] and out[1, 1].tolist() == list(BACKGROUND)

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.gif", transparency=0)  # palette index 0 is transparent
    out = np.asarray(decode(tmp_path / "p.gif"))
    assert out[0, 0].tolist() == [200, 10, 10] and out[2, 2].tolist() == list(BACKGROUND)

    key = np.zeros((4, 4, 3), np.uint8)
    key[0, 0] = (1, 2, 3)
    Image.fromarray(key).save(tmp_path / "key.png", transparency=(0, 0, 0))  # a colour key
    out = np.asarray(decode(tmp_path / "key.png"))
    assert out[0, 0].tolist() == [1, 2, 3] and out[3, 3].tolist() == list(BACKGROUND)


# ---------------------------------------------------------------- frames, colour, formats


def test_animations_and_multipage_files_give_their_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:],
                   lossless=True)
    for name in ("anim.gif", "pages.tif", "anim.webp"):
        with Image.open(tmp_path / name) as img:
            assert img.n_frames == 3
        out = np.asarray(decode(tmp_path / name)).astype(int)
        assert np.abs(out - (200, 0, 0)).max() <= 3, name


def test_cmyk_and_palette_convert_to_their_colours(tmp_path: Path):
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # pure cyan
    cmyk.putpixel((0, 0), (0, 0, 0, 255))  # black
    cmyk.save(tmp_path / "cmyk.tif")
    out = np.asarray(decode(tmp_path / "cmyk.tif"))
    assert out[1, 1].tolist() == [0, 255, 255] and out[0, 0].tolist() == [0, 0, 0]
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)  # Adobe's inverted CMYK JPEG
    out = np.asarray(decode(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(out[2, 2] - (0, 255, 255)).max() <= 8

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert np.asarray(decode(tmp_path / "pal.png"))[0, 0].tolist() == [12, 34, 56]


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_phone_formats_decode(tmp_path: Path, suffix: str):
    assert suffix in IMAGE_SUFFIXES
    picture = photo(5, 64, 48)
    picture[:] = np.asarray(Image.fromarray(picture).resize((6, 8)).resize((48, 64)))  # smooth
    Image.fromarray(picture).save(tmp_path / f"p{suffix}", quality=95)
    out = np.asarray(decode(tmp_path / f"p{suffix}"))
    assert out.shape == picture.shape
    assert np.abs(out.astype(int) - picture).mean() < 6  # lossy, but the same picture


def test_heic_orientation_is_applied_once(tmp_path: Path):
    """A HEIC's rotation is its own transform boxes, which libheif applies; pillow-heif then
    resets the EXIF tag to 1, so exif_transpose does not turn the picture a second time."""
    stored = Image.fromarray(photo(6, 32, 48))
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    stored.save(tmp_path / "o.heic", exif=exif, quality=95)
    with Image.open(tmp_path / "o.heic") as img:
        assert img.getexif().get(ORIENTATION, 1) == 1
        shown = img.size
    assert decode(tmp_path / "o.heic").size == shown


def test_unreadable_files_are_one_line_naming_them(tmp_path: Path):
    (tmp_path / "bad.heic").write_bytes(b"not a heic at all")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("bad.heic", "empty.png"):
        with pytest.raises(TlflowError, match=name) as err:
            read_image(tmp_path / name, lambda img: img)
        assert "\n" not in str(err.value)


def test_the_rules_are_part_of_the_extractor_id():
    assert DECODING != "pil-rgb/1"  # the rules changed: stores of the old ones are not reused


def test_input_size_auto_is_the_models_own_unless_the_images_are_tiny(tmp_path: Path):
    from tlflow.tasks.lib.data.decode import input_size_for

    def folder(name: str, size: tuple[int, int], n: int = 5) -> list[Path]:
        files = []
        for i in range(n):
            f = tmp_path / name / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (i, 0, 0)).save(f)
            files.append(f)
        return files

    photos, digits, small = folder("p", (500, 375)), folder("d", (8, 8)), folder("s", (20, 30))
    assert input_size_for("auto", 224, photos)[0] == 224
    size, why = input_size_for("auto", 224, digits)
    assert size == 64 and "median side 8 px" in why  # 8 x 8, a multiple of 32
    assert input_size_for("auto", 224, small)[0] == 160  # 8 x 20 = 160
    assert input_size_for(None, 224, digits) == (224, "the model's own input size "
                                                      "(extract.image_size: null)")
    assert input_size_for(48, 224, photos)[0] == 48
    assert input_size_for("auto", 224, [tmp_path / "missing.png"])[0] == 224
