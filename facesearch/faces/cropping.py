"""Cropping one photo file: read, decode, check, detect, crop, write; shared by the crop stage, the CLI
and ``check-data``.

:func:`process_image` is the single guarded entry point: it never raises for
anything one photo does. Every known failure becomes its manifest reject
reason; any other exception (a detector or encoder bug a hostile file
triggers) becomes ``error`` and is logged with the file name, so one bad file
never ends a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from collections import Counter
from dataclasses import asdict, dataclass

import cv2
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.celeba import Annotations, Entry, file_type_problem
from facesearch.data.images import DecodedImage, ImageRejected, decode_image
from facesearch.faces.config import FaceConfig, find_faces
from facesearch.faces.sheet import cut_face

log = logging.getLogger(__name__)

# Used when a caller passes no crop.max_file_bytes / crop.max_aspect (the evaluate CLI's
# params-less mode); the crop stage always passes params.yaml's values.
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
DEFAULT_MAX_ASPECT = 8.0

# crop.format -> (PIL encoder, file extension). jpeg: small (~9 KB a 150 px chip at quality 95);
# png: lossless, the very pixels the app feeds a model from a query photo cut in memory (~3.7x the bytes).
CROP_FORMATS = {"jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}

_HASH_DIGITS = 16  # 64 bits of the name's SHA-256: a collision in 200k names has odds ~1e-9, and is handled
_STEM_CHARS = 40  # enough of the original name to recognise a crop by eye


@dataclass(frozen=True)
class CropLimits:
    """The file- and image-level limits; field names match ``params.yaml: crop``."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_pixels: int = 40_000_000
    min_image_side: int = 32
    max_aspect: float = DEFAULT_MAX_ASPECT

    @classmethod
    def from_params(cls, crop: dict) -> CropLimits:
        return cls(**{k: crop[k] for k in cls.__dataclass_fields__})


# How chips are written when a caller passes no crop block (params.yaml: crop.jpeg_quality, format).
WRITE_DEFAULTS = {"jpeg_quality": 95, "format": "jpeg"}


def image_guards(crop: dict) -> dict:
    """The crop stage's file and image guards and chip format: each ``crop`` key, else its default."""
    defaults = {**WRITE_DEFAULTS, **asdict(CropLimits())}
    return {k: crop.get(k, v) for k, v in defaults.items()}


def check_format(fmt: str) -> str:
    """``fmt`` when it is a ``crop.format``, else ValueError naming the choices."""
    if fmt not in CROP_FORMATS:
        raise ValueError(f"crop.format must be one of {sorted(CROP_FORMATS)}, not {fmt!r}")
    return fmt


def _crop_name(name: str, digits: int, ext: str) -> str:
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    safe = re.sub(r"[^A-Za-z0-9-]+", "-", stem).strip("-")[:_STEM_CHARS]
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:digits]
    return f"{safe}_{digest}{ext}"


def crop_names(file_names: list[str], digits: int = _HASH_DIGITS, fmt: str = "jpeg") -> dict[str, str]:
    """Map each input file name to a unique, safe, bounded-length crop file name.

    ``<sanitised stem>_<first digits of sha256(name)>.jpg`` (``.png`` for ``fmt`` png):
    the stem (ASCII letters, digits and ``-`` only, at most 40 characters, so never
    hidden, never over 255 bytes, whatever the input's encoding) is for people; the hash of the *full*
    name makes it unique. Injective: the stem holds no ``_``, so the hash is
    everything between the last ``_`` and the extension, and distinct hashes give
    distinct names. Names whose short hashes collide within ``file_names`` get the
    full 64-digit hash instead (a different length, so they cannot meet a short one).
    Hex digits are lower case, so the names stay distinct on case-insensitive file systems.
    """
    ext = CROP_FORMATS[check_format(fmt)][1]
    short = {n: _crop_name(n, digits, ext) for n in file_names}
    # Compared case-folded: on a case-insensitive file system A_5.jpg and a_5.jpg are one file.
    counts = Counter(c.lower() for c in short.values())
    out = {n: (c if counts[c.lower()] == 1 else _crop_name(n, 64, ext)) for n, c in short.items()}
    if len({c.lower() for c in out.values()}) != len(out):
        raise RuntimeError("SHA-256 collision between two file names")  # not expected in this universe
    return out


def pre_reason(entry: Entry, annotations: Annotations) -> str | None:
    """The reject reason known before the file is opened (its entry and the annotations), or None."""
    if entry.problem is not None:
        return entry.problem
    if entry.name in annotations.report.ambiguous_identities:
        return M.Reason.AMBIGUOUS_IDENTITY.value
    if entry.name not in annotations.identities:
        return M.Reason.NO_IDENTITY.value
    return None


def read_photo(path: str | bytes | os.PathLike, max_file_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_file_bytes``, else :class:`ImageRejected`.

    Checked by ``stat`` before opening (a FIFO or device is never opened) and again
    by ``fstat`` on the open descriptor (the entry may have changed meanwhile). The
    open is non-blocking, so even a FIFO swapped in at the last moment cannot hang
    the run, and the read stops after ``max_file_bytes + 1`` bytes whatever the
    file claims.
    """
    problem, detail = file_type_problem(path)
    if problem is not None:
        raise ImageRejected(problem, detail)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageRejected(M.Reason.UNREADABLE, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejected(M.Reason.NOT_A_FILE, "changed into a non-regular file while being opened")
        if st.st_size > max_file_bytes:
            raise ImageRejected(M.Reason.FILE_TOO_LARGE, f"{st.st_size} bytes > crop.max_file_bytes {max_file_bytes}")
        chunks, size = [], 0
        while size <= max_file_bytes:
            chunk = os.read(fd, min(1 << 20, max_file_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_file_bytes:
            raise ImageRejected(M.Reason.FILE_TOO_LARGE, f"grew past crop.max_file_bytes {max_file_bytes}")
        return b"".join(chunks)
    except OSError as exc:
        raise ImageRejected(M.Reason.UNREADABLE, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def shape_reason(width: int, height: int, limits: CropLimits) -> str | None:
    """``too_small`` or ``bad_aspect`` for a decoded image of this size, or None."""
    if min(width, height) < limits.min_image_side:
        return M.Reason.TOO_SMALL.value
    if max(width, height) > limits.max_aspect * min(width, height):
        return M.Reason.BAD_ASPECT.value
    return None


def inspect_photo(src: str | bytes | os.PathLike, limits: CropLimits, row: dict) -> DecodedImage | None:
    """Read, decode and size-check one photo: the checks before detection.

    Fills ``row`` (sha256, width, height, source_mode, and reject_reason on
    failure); returns the image when it may go on to detection, else None.
    Raises only for unexpected errors (the caller guards).
    """
    try:
        data = read_photo(src, limits.max_file_bytes)
        row[M.SHA256] = hashlib.sha256(data).hexdigest()
        image = decode_image(data, limits.max_pixels)
    except ImageRejected as exc:
        row[M.REASON] = str(exc.reason)
        log.debug("%s: %s", os.fsdecode(src), exc)
        return None
    row.update({M.WIDTH: image.width, M.HEIGHT: image.height, M.SOURCE_MODE: image.source_mode})
    reason = shape_reason(image.width, image.height, limits)
    if reason is not None:
        row[M.REASON] = reason
        return None
    return image


def process_image(
    src: str,
    dst: str,
    cfg: FaceConfig,
    jpeg_quality: int,
    max_pixels: int,
    min_image_side: int,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    fmt: str = "jpeg",
) -> dict:
    """Read, decode, detect and crop one photo; write the crop to ``dst`` when kept.

    ``fmt``: ``crop.format``, the encoding of the written crop (``jpeg`` at
    ``jpeg_quality``, or lossless ``png``); name ``dst`` with :func:`crop_names` of the
    same format. Returns the per-image manifest fields. Never raises for anything one
    photo causes: known failures get their reason, anything else ``error``.
    """
    check_format(fmt)  # a caller's mistake, not a photo's: raised, not a reject reason
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    limits = CropLimits(max_file_bytes, max_pixels, min_image_side, max_aspect)
    row: dict = {M.STATUS: M.Status.REJECTED.value}
    try:
        return _process(src, dst, cfg, jpeg_quality, limits, row, fmt)
    except Exception as exc:  # the point: one photo never ends the run
        log.warning("%s: unexpected %s: %s; rejected as error", os.fsdecode(src), type(exc).__name__, exc)
        with contextlib.suppress(OSError):
            os.unlink(dst)  # a half-written crop must not be mistaken for one
        keep = {M.SHA256, M.WIDTH, M.HEIGHT, M.SOURCE_MODE}
        known = {k: row[k] for k in keep & set(row)}
        return {M.STATUS: M.Status.REJECTED.value, M.REASON: M.Reason.ERROR.value, **known}


def _process(src, dst, cfg: FaceConfig, jpeg_quality: int, limits: CropLimits, row: dict, fmt: str) -> dict:
    image = inspect_photo(src, limits, row)
    if image is None:
        return row
    detection = find_faces(image.rgb, cfg)
    row[M.N_FACES] = len(detection.boxes)
    row[M.DETECTOR] = detection.detector
    if detection.chosen is None:
        row[M.REASON] = detection.reason
        return row
    x, y, w, h = detection.chosen
    points = detection.landmarks_of(detection.chosen)
    crop = cut_face(image.rgb, detection.chosen, cfg, points=points)
    encoder = CROP_FORMATS[fmt][0]
    Image.fromarray(crop).save(dst, format=encoder, **({"quality": jpeg_quality} if encoder == "JPEG" else {}))
    row.update({M.STATUS: M.Status.KEPT.value, M.BBOX_X: x, M.BBOX_Y: y, M.BBOX_W: w, M.BBOX_H: h})
    row[M.SCORE] = detection.score_of(detection.chosen)
    if points is not None:
        row.update(zip(M.LANDMARK_COLUMNS, (v for point in points for v in point), strict=True))
    return row
