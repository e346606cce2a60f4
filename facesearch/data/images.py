"""Decoding untrusted image bytes into 8-bit RGB arrays, or a reason why not.

Inputs come from photo dumps and user uploads, so anything can arrive: empty
or truncated files, text files named ``.jpg``, grayscale, palette, CMYK,
alpha and 16-bit images, and decompression bombs (a few KB of PNG that claim
a 100,000 x 100,000 canvas), EXIF or TIFF tags of the wrong type, and JPEGs
whose scan data is damaged in the middle. Every failure maps to one reject
reason from :mod:`facesearch.data.manifest`; nothing here raises anything but
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

Memory, with ``max_side`` (the app's bounded decode): the full-size image is
decoded once, in its own mode, and nothing else full-size is made. Transparency is
composited a strip of rows at a time (:func:`_flattened`): PIL's ``reduce`` and
``resize`` of RGBA/LA premultiply a full-size copy first, and compositing the
full-size image made three more. WebP is checked from its RIFF header
(:func:`webp_header`) before PIL sees it, because PIL's WebP decoder allocates two
full-size RGBA canvases when the file is *opened* and two more copies when it is
loaded (~16 bytes a pixel). A still, opaque, lossy WebP (a photo) is decoded by
OpenCV at 1/2-1/8 scale instead (~3.4 bytes a pixel); any other WebP (alpha,
lossless, animated) has no bounded decoder here (libwebp's lossless decoder itself
holds a full-size ARGB copy), so above :data:`WEBP_CANVAS_MAX_PIXELS` it is
refused rather than decoded.
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

from facesearch.data.manifest import Reason

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


# Largest WebP decoded through PIL's canvas (alpha, lossless or animated) when a bounded decode is
# asked for (max_side): at ~16 bytes a pixel (PIL's two canvases, the frame's bytes, the image),
# 12 MP (4000 x 3000) costs ~190 MB, the budget a 40 MP RGB PNG takes (bench/app.py --hostile).
WEBP_CANVAS_MAX_PIXELS = 12_000_000
# Pixels composited at a time when flattening transparency: 1 MB of RGBA a strip, and the
# compositing's five strip-sized copies stay ~5 MB; more strips cost no measurable time.
_STRIP_PIXELS = 1 << 18


@dataclass(frozen=True)
class WebPHeader:
    """What a WebP file's RIFF chunks say, read without decoding (nor allocating) anything."""

    width: int
    height: int
    lossless: bool  # a VP8L bitstream
    alpha: bool  # transparency: the VP8X alpha flag, an ALPH chunk, or VP8L's alpha bit
    animated: bool  # the VP8X animation flag, or ANIM/ANMF chunks
    exif: bytes | None  # the EXIF chunk's payload

    @property
    def bounded(self) -> bool:
        """Whether a reduced decode without PIL's canvases exists for it (a still, opaque, lossy WebP)."""
        return not (self.lossless or self.alpha or self.animated)


def webp_header(data: bytes) -> WebPHeader | None:
    """The header of WebP ``data``; None when ``data`` is no RIFF WebP at all.

    The canvas size is read where PIL and libwebp read it (the first chunk), so the
    pixel check sees the size they would allocate. A WebP whose size cannot be read
    is :class:`ImageRejected` (``corrupt``): libwebp would refuse it too, after
    allocating whatever it did parse.
    """
    if len(data) < 16 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    size, lossless, alpha, animated, exif = None, False, False, False, None
    pos = 12
    # A still image has a handful of chunks (VP8X, ICCP, ALPH, the bitstream, EXIF, XMP); a file of
    # a million empty ones would only cost time. Past the cap, an EXIF chunk goes unread (no turn).
    for _ in range(64):
        if pos + 8 > len(data):
            break
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        head = data[pos + 8 : pos + 8 + min(length, 10)]  # the fields read below; not the bitstream
        if kind == b"VP8X" and pos == 12 and len(head) == 10:
            alpha, animated = bool(head[0] & 0x10), bool(head[0] & 0x02)
            size = (int.from_bytes(head[4:7], "little") + 1, int.from_bytes(head[7:10], "little") + 1)
        elif kind == b"VP8 ":
            if pos == 12 and len(head) == 10 and head[3:6] == b"\x9d\x01\x2a":
                size = (int.from_bytes(head[6:8], "little") & 0x3FFF, int.from_bytes(head[8:10], "little") & 0x3FFF)
        elif kind == b"VP8L":
            lossless = True
            if len(head) >= 5 and head[0] == 0x2F:
                bits = int.from_bytes(head[1:5], "little")
                alpha = alpha or bool(bits >> 28 & 1)
                if pos == 12:
                    size = ((bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1)
        elif kind == b"ALPH":
            alpha = True
        elif kind in (b"ANIM", b"ANMF"):
            animated = True
        elif kind == b"EXIF":
            exif = data[pos + 8 : pos + 8 + length]
        pos += 8 + length + (length & 1)  # chunks are padded to an even length
    if size is None:
        raise ImageRejected(Reason.CORRUPT, "WebP without a readable canvas size")
    return WebPHeader(*size, lossless, alpha, animated, exif)


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
# applied after reduction on the reduced path (_turned): exif_transpose copies the full-size image.
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


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _flattened(img: Image.Image, factor: int) -> np.ndarray:
    """``img`` (a mode with alpha) composited onto mid-gray as :func:`_to_rgb` does, RGB, reduced by ``factor``.

    A strip of rows at a time into one preallocated array, so nothing full-size exists
    beside the decoded image: PIL's own ``reduce`` of RGBA/LA premultiplies the whole
    image first (+4 bytes a pixel), and compositing at full size made three more
    copies. Compositing before averaging is the right order: the average of composited
    pixels is what the composite of the shrunk image should show.
    """
    w, h = img.size
    out = np.empty((-(-h // factor), -(-w // factor), 3), np.uint8)  # reduce's size: partial blocks count
    rows = factor * max(1, _STRIP_PIXELS // (w * factor))
    for y in range(0, h, rows):
        strip = _to_rgb(img.crop((0, y, w, min(h, y + rows))))
        if factor > 1:
            strip = strip.reduce(factor)
        out[y // factor : y // factor + strip.height] = np.asarray(strip)
    return out


def _reduced(img: Image.Image, max_side: int) -> tuple[Image.Image | np.ndarray, int]:
    """An opened (not yet loaded) image decoded small, never converted at full size; and its EXIF orientation.

    JPEG: libjpeg's DCT scaling (``draft``) decodes at 1/2, 1/4 or 1/8 size
    directly. Other formats decode at full size in their own mode (at most
    ~160 MB at 40 MP) and are shrunk by an integer factor before any conversion,
    the full-size image freed as soon as the caller rebinds its name; transparency
    is flattened strip by strip into RGB (:func:`_flattened`, an array). The
    orientation is the caller's to apply (:func:`_turned`), once the image is small.
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
    elif img.mode in _ALPHA_MODES:
        return _flattened(img, max(1, factor)), orientation
    elif factor > 1:
        if img.mode in ("1", "P"):
            # Palette indices and bits cannot be averaged (PIL forces nearest for them).
            img = img.resize((img.width // factor, img.height // factor), Image.Resampling.NEAREST)
        else:
            img = img.reduce(factor)
    return img, orientation


def _turned(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """``rgb`` shown upright for an EXIF ``orientation`` (as ``ImageOps.exif_transpose``)."""
    return np.asarray(Image.fromarray(rgb).transpose(_ORIENT[orientation])) if orientation in _ORIENT else rgb


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


def _reduced_webp(data: bytes, header: WebPHeader, max_side: int) -> DecodedImage:
    """A still, opaque, lossy WebP decoded by OpenCV's libwebp at 1/2-1/8 scale, upright, RGB.

    OpenCV decodes the VP8 frame into one BGR buffer (3 bytes a pixel; PIL's WebP
    decoder holds ~16) and shrinks it right away; it neither reads WebP's EXIF nor
    is asked to (IGNORE_ORIENTATION), so the header's orientation is applied here,
    after shrinking, as the reduced PIL path does (:func:`_turned`).
    """
    longer = max(header.width, header.height)
    scale = next((k for k in (8, 4, 2) if longer // k >= max_side), 1)
    flag = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2,
            1: cv2.IMREAD_COLOR}[scale]  # fmt: skip
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.ndim != 3:
        raise ImageRejected(Reason.CORRUPT, "libwebp could not decode it")
    rgb = shrink(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), max_side)
    del bgr
    orientation = 1
    if header.exif:
        exif = Image.Exif()
        exif.load(header.exif)
        orientation = exif.get(ExifTags.Base.Orientation, 1)
    rgb = _turned(rgb, orientation)
    return DecodedImage(rgb=rgb, width=rgb.shape[1], height=rgb.shape[0], source_mode="RGB")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise ImageRejected(Reason.TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels")


def _decode(data: bytes, max_pixels: int, strict: bool, max_side: int = 0) -> DecodedImage:
    # WebP before PIL opens it: PIL's WebP decoder allocates its canvases on open (see the module doc).
    webp = webp_header(data)
    if webp is not None:
        _check_size(webp.width, webp.height, max_pixels)
        if max_side and max(webp.width, webp.height) > max_side:
            if webp.bounded:
                return _reduced_webp(data, webp, max_side)
            if webp.width * webp.height > WEBP_CANVAS_MAX_PIXELS:
                raise ImageRejected(Reason.TOO_LARGE, f"{webp.width}x{webp.height} WebP with alpha, lossless or "
                                    f"animated exceeds {WEBP_CANVAS_MAX_PIXELS} pixels")  # fmt: skip
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
            _check_size(width, height, max_pixels)
            if max_side and max(width, height) > max_side:
                source_mode = img.mode
                # Rebinding ``img`` frees the full-size decode before the RGB conversion.
                img, orientation = _reduced(img, max_side)
                if not isinstance(img, np.ndarray):
                    img = np.asarray(img if img.mode == "RGB" else _to_rgb(img), dtype=np.uint8)
                rgb = _turned(shrink(img, max_side), orientation)
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
