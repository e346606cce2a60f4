"""Decoding untrusted image bytes into 8-bit RGB arrays, or a reason why not.

Inputs come from photo dumps and user uploads, so anything can arrive: empty
or truncated files, text files named ``.jpg``, grayscale, palette, CMYK,
alpha and 16-bit images, and decompression bombs (a few KB of PNG that claim
a 100,000 x 100,000 canvas), EXIF or TIFF tags of the wrong type, and JPEGs
whose scan data is damaged in the middle. Every failure maps to one reject
reason from :mod:`facesearch.manifest`; nothing here raises anything but
:class:`ImageRejected`.

Damaged JPEG scans: libjpeg recovers from them with a *warning* ("Corrupt JPEG
data: ...") and returns an image with a smeared or magenta band, and PIL
silences those warnings entirely. So a JPEG is decoded a second time, strictly,
by OpenCV's libjpeg, whose warnings go to the C ``stderr``: that file
descriptor is pointed at a temporary file for the duration of the decode
(under a lock; anything else written meanwhile is passed on to the real
stderr) and any libjpeg corruption warning rejects the file. The strict pass
decodes at 1/8 scale, which still walks every Huffman code of the scan (the
warnings come from there) but skips most of the inverse DCT.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from facesearch.manifest import Reason

# Formats a face photo plausibly comes in; anything else PIL can parse (EPS,
# ICNS, PSD, ...) widens the attack surface for no benefit.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"})


class ImageRejected(Exception):
    """The bytes are not a usable image; ``reason`` is a :class:`Reason` value."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3, uint8
    width: int
    height: int
    source_mode: str  # PIL mode before conversion, e.g. "RGB", "CMYK", "I;16"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: scale the used range into 8 bits rather than
        # clipping, so a 16-bit PNG is not rendered as all-white.
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        span = hi - lo if hi > lo else 1.0
        img = Image.fromarray(((arr - lo) / span * 255 + 0.5).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto mid-gray: black or white would invent
        # strong edges that a Haar detector responds to.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


# libjpeg's warnings that mean the pixels are not what was encoded (jerror.h:
# JWRN_HIT_MARKER, JWRN_EXTRANEOUS_DATA, JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC, ...).
_JPEG_CORRUPT = b"Corrupt JPEG data"
_JPEG_TRUNCATED = b"Premature end of JPEG file"  # JWRN_JPEG_EOF
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[bytes]]:
    """Collect what C code writes to file descriptor 2 meanwhile (yielded list gets one item)."""
    out: list[bytes] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read())


def strict_jpeg_check(data: bytes) -> None:
    """Raise :class:`ImageRejected` if libjpeg reports the JPEG ``data`` as corrupt or truncated."""
    with _captured_stderr() as captured:
        decoded = cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION
        )
    messages = captured[0]
    other = b"\n".join(
        line for line in messages.splitlines() if _JPEG_CORRUPT not in line and _JPEG_TRUNCATED not in line
    )
    if other.strip():
        os.write(2, other + b"\n")  # not ours: pass it on
    if _JPEG_TRUNCATED in messages:
        raise ImageRejected(Reason.TRUNCATED, "libjpeg: premature end of JPEG file")
    if _JPEG_CORRUPT in messages:
        first = next(line for line in messages.splitlines() if _JPEG_CORRUPT in line)
        raise ImageRejected(Reason.CORRUPT, "libjpeg: " + first.decode("ascii", "replace").strip())
    if decoded is None:
        raise ImageRejected(Reason.CORRUPT, "libjpeg could not decode it")


# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose),
# applied after reduction on the reduced path: exif_transpose copies the full-size image.
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # fmt: skip


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``side``."""
    s = side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def shrink(arr: np.ndarray, side: int) -> np.ndarray:
    """``arr`` area-averaged down so its longer side is at most ``side`` (unchanged if it already is)."""
    h, w = arr.shape[:2]
    if max(h, w) <= side:
        return arr
    return cv2.resize(arr, _fit(w, h, side), interpolation=cv2.INTER_AREA)


def _reduced(img: Image.Image, max_side: int) -> Image.Image:
    """An opened (not yet loaded) image decoded small, upright, never converted at full size.

    JPEG: libjpeg's DCT scaling (``draft``) decodes at 1/2, 1/4 or 1/8 size
    directly. Other formats decode at full size in their own mode (at most
    ~160 MB at 40 MP) and are shrunk by an integer factor before any conversion
    or rotation, the full-size image freed as soon as the small one exists.
    """
    w, h = img.size
    ratio = max_side / max(w, h)
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    img.draft(None, (max(1, int(w * ratio)), max(1, int(h * ratio))))  # no-op except for JPEG
    img.load()
    factor = max(img.size) // max_side
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # High-bit images are shrunk all the way here, in their own depth (a box filter is an
        # area average): the conversion to 8 bits works in float64, 8 bytes a pixel, in copies.
        if max(img.size) > max_side:
            img = img.resize(_fit(img.width, img.height, max_side), Image.Resampling.BOX)
    elif factor > 1:
        if img.mode in ("1", "P"):
            # Palette indices and bits cannot be averaged (PIL forces nearest for them).
            img = img.resize((img.width // factor, img.height // factor), Image.Resampling.NEAREST)
        else:
            img = img.reduce(factor)
    return img.transpose(_ORIENT[orientation]) if orientation in _ORIENT else img


def decode_image(data: bytes, max_pixels: int, *, strict: bool = True, max_side: int = 0) -> DecodedImage:
    """Decode ``data`` to RGB uint8, honouring EXIF orientation.

    ``max_side`` > 0: a larger image comes back area-shrunk to at most that many
    pixels on its longer side, decoded reduced (see :func:`_reduced`), so a
    40 MP upload never exists in memory as 120 MB of RGB.

    Raises :class:`ImageRejected` for empty, non-image, unsupported-format,
    oversized (``width * height > max_pixels``, checked from the header before
    any pixel is decoded) or corrupt/truncated data, and for any other
    exception a hostile file provokes in the decoders (``corrupt``).
    ``strict``: also reject JPEGs libjpeg only warns about (see the module doc).
    """
    if not data:
        raise ImageRejected(Reason.EMPTY_FILE)
    try:
        return _decode(data, max_pixels, strict, max_side)
    except ImageRejected:
        raise
    except MemoryError:
        raise ImageRejected(Reason.TOO_LARGE, "out of memory while decoding") from None
    except Exception as exc:  # the contract: a bad file never raises anything else
        # E.g. struct.error from an EXIF SHORT tag stored as ASCII in exif_transpose,
        # TypeError/OverflowError from TIFF StripOffsets stored as DOUBLE or RATIONAL.
        raise ImageRejected(Reason.CORRUPT, f"{type(exc).__name__}: {exc}") from None


def _decode(data: bytes, max_pixels: int, strict: bool, max_side: int = 0) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and twice that;
            # our own header check below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise ImageRejected(Reason.UNSUPPORTED_FORMAT, str(fmt))
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageRejected(Reason.TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels")
            if max_side and max(width, height) > max_side:
                source_mode = img.mode
                # Rebinding ``img`` frees the full-size decode before the RGB conversion.
                img = _reduced(img, max_side)
                rgb = shrink(np.asarray(img if img.mode == "RGB" else _to_rgb(img), dtype=np.uint8), max_side)
            else:
                img.load()
                source_mode = img.mode
                rgb = np.asarray(_to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8)
            if strict and fmt in ("JPEG", "MPO"):
                strict_jpeg_check(data)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected(Reason.NOT_AN_IMAGE, str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(Reason.TOO_LARGE, str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncation as OSError("image file is truncated ...").
        reason = Reason.TRUNCATED if "truncated" in str(exc).lower() else Reason.CORRUPT
        raise ImageRejected(reason, str(exc)) from None
    return DecodedImage(rgb=rgb, width=rgb.shape[1], height=rgb.shape[0], source_mode=source_mode)
