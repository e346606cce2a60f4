"""Cropping one photo file: decode, detect, crop, write; shared by the crop stage and the CLI.

Never raises for a bad input file: every failure becomes a manifest reject reason.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import cv2
from PIL import Image

from facesearch import manifest as M
from facesearch.faces import FaceConfig, face_crop, find_faces
from facesearch.images import ImageRejected, decode_image

log = logging.getLogger("facesearch.crop")


def crop_names(file_names: list[str]) -> dict[str, str]:
    """Map each input file name to a unique crop file name (``<stem>.jpg``).

    Two inputs can share a stem (``a.jpg`` and ``a.png``); those keep their
    extension in the name instead, so no crop overwrites another.
    """
    stems = Counter(Path(n).stem for n in file_names)
    return {
        n: (f"{Path(n).stem}.jpg" if stems[Path(n).stem] == 1 else f"{n.replace('.', '_')}.jpg") for n in file_names
    }


def process_image(
    src: str,
    dst: str,
    cfg: FaceConfig,
    jpeg_quality: int,
    max_pixels: int,
    min_image_side: int,
) -> dict:
    """Decode, detect and crop one photo; write the crop to ``dst`` when kept.

    Returns the per-image manifest fields. Never raises for a bad input file:
    every failure becomes a reject reason.
    """
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    row: dict = {M.STATUS: M.Status.REJECTED.value}
    try:
        data = Path(src).read_bytes()
    except OSError as exc:
        row[M.REASON] = M.Reason.UNREADABLE.value
        log.debug("%s: %s", src, exc)
        return row
    row[M.SHA256] = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, max_pixels)
    except ImageRejected as exc:
        row[M.REASON] = exc.reason
        return row
    row.update({M.WIDTH: image.width, M.HEIGHT: image.height, M.SOURCE_MODE: image.source_mode})
    if min(image.width, image.height) < min_image_side:
        row[M.REASON] = M.Reason.TOO_SMALL.value
        return row
    detection = find_faces(image.rgb, cfg)
    row[M.N_FACES] = len(detection.boxes)
    row[M.DETECTOR] = detection.detector
    if detection.chosen is None:
        row[M.REASON] = detection.reason
        return row
    x, y, w, h = detection.chosen
    crop = face_crop(image.rgb, detection.chosen, cfg)
    Image.fromarray(crop).save(dst, format="JPEG", quality=jpeg_quality)
    row.update({M.STATUS: M.Status.KEPT.value, M.BBOX_X: x, M.BBOX_Y: y, M.BBOX_W: w, M.BBOX_H: h})
    row[M.ALIGN] = cfg.alignment
    return row
