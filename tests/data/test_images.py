from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from conftest import bomb_png, broken_files, jpeg_bytes, png_bytes, variants_of
from PIL import Image

from facesearch.data import images
from facesearch.data.images import ImageRejected, decode_image
from facesearch.data.manifest import Reason

MAX = 40_000_000


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def test_rgb_jpeg(photo):
    out = decode_image(jpeg_bytes(photo), MAX)
    assert out.rgb.shape == (60, 80, 3) and out.rgb.dtype == np.uint8
    assert (out.width, out.height, out.source_mode) == (80, 60, "RGB")


@pytest.mark.parametrize(
    ("name", "mode"),
    [("gray.jpg", "L"), ("cmyk.jpg", "CMYK"), ("rgba.png", "RGBA"), ("sixteen.png", "I;16"), ("palette.png", "P")],
)
def test_awkward_modes_become_rgb(photo, name, mode):
    out = decode_image(variants_of(photo)[name], MAX)
    assert out.rgb.shape == (60, 80, 3) and out.rgb.dtype == np.uint8
    assert out.source_mode == mode


def test_sixteen_bit_is_scaled_not_clipped(photo):
    gray = np.asarray(photo.convert("L"))
    out = decode_image(variants_of(photo)["sixteen.png"], MAX).rgb[..., 0]
    # 8-bit value v was stored as v*257; scaling back must recover v, not saturate at 255.
    assert np.abs(out.astype(int) - gray.astype(int)).max() <= 1


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = jpeg_bytes(photo, exif=exif)
    out = decode_image(data, MAX)
    assert (out.width, out.height) == (60, 80)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero.jpg", Reason.EMPTY_FILE),
        ("text.jpg", Reason.NOT_AN_IMAGE),
        ("random.jpg", Reason.NOT_AN_IMAGE),
        ("truncated.jpg", Reason.TRUNCATED),
        ("bomb.png", Reason.TOO_LARGE),
        ("notes.txt", Reason.NOT_AN_IMAGE),
    ],
)
def test_bad_inputs_are_rejected_with_reason(photo, name, reason):
    data = broken_files(jpeg_bytes(photo))[name]
    with pytest.raises(ImageRejected) as info:
        decode_image(data, MAX)
    assert info.value.reason == reason


def test_corrupt_jpeg_is_rejected_or_decoded_never_crashes(photo):
    data = broken_files(jpeg_bytes(photo))["corrupt.jpg"]
    try:
        out = decode_image(data, MAX)
    except ImageRejected as exc:
        assert exc.reason in (Reason.CORRUPT, Reason.TRUNCATED)
    else:
        assert out.rgb.dtype == np.uint8


def test_pixel_limit_is_checked_before_decoding(photo):
    with pytest.raises(ImageRejected) as info:
        decode_image(png_bytes(photo), max_pixels=80 * 60 - 1)
    assert info.value.reason == Reason.TOO_LARGE
    # A header claiming more than PIL's own bomb limit is rejected by ours first, as too_large.
    with pytest.raises(ImageRejected, match="too_large"):
        decode_image(bomb_png(200_000, 200_000), MAX)


def test_unsupported_format_is_rejected(photo):
    buf = io.BytesIO()
    photo.save(buf, format="PPM")
    with pytest.raises(ImageRejected) as info:
        decode_image(buf.getvalue(), MAX)
    assert info.value.reason == Reason.UNSUPPORTED_FORMAT


def webp(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", **kwargs)
    return buf.getvalue()


def spy_on_conversions(monkeypatch) -> list[tuple[str, str, int]]:
    """(what, mode, pixels) of every call of images._to_rgb and Image.reduce from now on."""
    calls: list[tuple[str, str, int]] = []
    to_rgb, reduce = images._to_rgb, Image.Image.reduce

    def spied_to_rgb(img):
        calls.append(("to_rgb", img.mode, img.width * img.height))
        return to_rgb(img)

    def spied_reduce(img, *args, **kwargs):
        calls.append(("reduce", img.mode, img.width * img.height))
        return reduce(img, *args, **kwargs)

    monkeypatch.setattr(images, "_to_rgb", spied_to_rgb)
    monkeypatch.setattr(Image.Image, "reduce", spied_reduce)
    return calls


def test_transparency_is_flattened_a_strip_at_a_time(monkeypatch):
    """A large RGBA or LA image is composited and reduced in strips: no conversion, composite or
    reduce ever sees the whole image (PIL's reduce of RGBA premultiplies a full-size copy), and
    the pixels are those of compositing the whole image, then reducing it."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (1501, 4100, 4), dtype=np.uint8)  # 6.2 MP: reduced by 2 for a 2048 side
    pixels[..., 3] = np.linspace(0, 255, 4100).astype(np.uint8)
    for mode in ("RGBA", "LA"):
        data = png_bytes(Image.fromarray(pixels).convert(mode))
        calls = spy_on_conversions(monkeypatch)
        out = decode_image(data, MAX, max_side=2048)
        monkeypatch.undo()
        assert calls and max(n for _, _, n in calls) <= max(images._STRIP_PIXELS, 2 * 4100), mode
        assert not [c for c in calls if c[0] == "reduce" and c[1] in ("RGBA", "LA")], mode
        whole = images.shrink(np.asarray(images._to_rgb(Image.open(io.BytesIO(data))).reduce(2)), 2048)
        assert out.rgb.shape == (750, 2048, 3) and np.array_equal(out.rgb, whole), mode
        assert out.source_mode == mode


def test_webp_header_is_read_as_pil_reads_it(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    frames = {"save_all": True, "append_images": [photo.rotate(90, expand=False)], "duration": 100}
    cases = {  # name: (bytes, lossless, alpha, animated, exif)
        "lossy": (webp(photo, quality=80), False, False, False, False),
        "lossy alpha": (webp(rgba, quality=80), False, True, False, False),
        "lossless": (webp(photo, lossless=True), True, False, False, False),
        "lossless alpha": (webp(rgba, lossless=True), True, True, False, False),
        "lossy exif": (webp(photo, quality=80, exif=exif.tobytes()), False, False, False, True),
        "animated": (webp(photo, **frames), False, False, True, False),
    }
    for name, (data, lossless, alpha, animated, has_exif) in cases.items():
        header = images.webp_header(data)
        assert (header.width, header.height) == Image.open(io.BytesIO(data)).size == (80, 60), name
        assert (header.lossless, header.alpha, header.animated, header.exif is not None) == (
            lossless, alpha, animated, has_exif), name  # fmt: skip
        assert header.bounded == (name in ("lossy", "lossy exif")), name
    assert images.webp_header(jpeg_bytes(photo)) is None and images.webp_header(b"") is None


def test_webp_bomb_is_refused_before_pil_opens_it(monkeypatch):
    """A few bytes of WebP header claiming 16384 x 16384: PIL's WebP decoder would allocate 2 GB of
    canvas on opening it; the header check refuses it first, and an unreadable header is corrupt."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x10\0\0\0" + (16383).to_bytes(3, "little") * 2
    vp8l = b"VP8L" + struct.pack("<I", 6) + b"\x2f" + b"\0" * 5
    body = b"WEBP" + vp8x + vp8l
    bomb = b"RIFF" + struct.pack("<I", len(body)) + body

    def no_pil(*args, **kwargs):
        raise AssertionError("PIL opened the bomb")

    monkeypatch.setattr(Image, "open", no_pil)
    for max_side in (0, 2048):
        with pytest.raises(ImageRejected) as info:
            decode_image(bomb, MAX, max_side=max_side)
        assert info.value.reason == Reason.TOO_LARGE
    headless = b"RIFF" + struct.pack("<I", 12) + b"WEBPVP8 " + struct.pack("<I", 0)
    with pytest.raises(ImageRejected) as info:
        decode_image(headless, MAX)
    assert info.value.reason == Reason.CORRUPT
