"""What every face detector returns, which face to keep when it finds several, and the square around a box.

A detector (:mod:`facesearch.faces.detectors`) answers a :class:`Detection`: every face box
of the pass that decided, in the photo's full-resolution pixels, and the one chosen by
``crop.policy`` (:func:`choose_face`), or why none was.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class Detection:
    boxes: tuple[Box, ...]  # all faces of the deciding pass, full-resolution coordinates
    detector: str  # the pass that decided: "haar_frontal", "haar_frontal_retry", "haar_profile", "dlib_hog"
    chosen: Box | None  # the face to crop, or None (see ``reason``)
    reason: str | None  # None, "no_face" or "multiple_faces"


def choose_face(boxes: tuple[Box, ...], detector: str, policy: str, width: int, height: int) -> Detection:
    """The detection outcome for ``boxes``: one face, none, or several resolved by ``policy``."""
    if len(boxes) == 1:
        return Detection(boxes, detector, boxes[0], None)
    if not boxes:
        return Detection(boxes, detector, None, "no_face")
    if policy == "largest":
        return Detection(boxes, detector, largest_face(boxes, width, height), None)
    return Detection(boxes, detector, None, "multiple_faces")


def largest_face(boxes: tuple[Box, ...], width: int, height: int) -> Box:
    """The largest box; among near-equal sizes (within 10%) the most central one."""
    cx, cy = width / 2, height / 2

    def key(b: Box) -> tuple[float, float]:
        area = b[2] * b[3]
        dist = ((b[0] + b[2] / 2 - cx) ** 2 + (b[1] + b[3] / 2 - cy) ** 2) ** 0.5
        # Quantise area on a log scale so sizes within ~10% tie and centrality decides.
        return (-round(np.log(area) / np.log(1.21)), dist)

    return min(boxes, key=key)


def crop_square(rgb: np.ndarray, box: Box, margin: float, size: int) -> np.ndarray:
    """Cut a square around ``box`` grown by ``margin`` (fraction of the box side per side).

    Parts outside the image are filled by replicating the border, so a face at
    the edge keeps its position in the crop instead of being shifted.
    """
    x, y, bw, bh = box
    side = max(bw, bh) * (1 + 2 * margin)
    cx, cy = x + bw / 2, y + bh / 2
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    s = max(1, round(side))
    h, w = rgb.shape[:2]
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + s - w), max(0, y0 + s - h)
    region = rgb[max(0, y0) : min(h, y0 + s), max(0, x0) : min(w, x0 + s)]
    if pad_l or pad_t or pad_r or pad_b:
        region = cv2.copyMakeBorder(region, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(region, (size, size), interpolation=interp)
