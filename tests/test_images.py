from __future__ import annotations

import numpy as np
import pytest
from conftest import bomb_png, broken_files, jpeg_bytes, png_bytes, variants_of
from PIL import Image

from facesearch.images import ImageRejected, decode_image
from facesearch.manifest import Reason

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
    import io

    buf = io.BytesIO()
    photo.save(buf, format="PPM")
    with pytest.raises(ImageRejected) as info:
        decode_image(buf.getvalue(), MAX)
    assert info.value.reason == Reason.UNSUPPORTED_FORMAT
