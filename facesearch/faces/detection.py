"""What every face detector returns, which face to keep when it finds several, and the square around a box.

A detector (:mod:`facesearch.faces.detectors`) answers a :class:`Detection`: every face box
of the pass that decided, in the photo's full-resolution pixels, and the one chosen by
``crop.policy`` (:func:`choose_face`), or why none was. A detector that also locates 5
landmarks per face (YuNet) gives them beside the boxes, in the same order, with each face's
score: a chip aligned on landmarks (:mod:`facesearch.faces.config`, ``align: arcface``) is then
cut from the detection itself, and the crop stage records them in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in pixels
# 5 (x, y) points in photo pixels, in the order of facesearch.data.manifest.LANDMARKS (right eye,
# left eye, nose tip, right and left mouth corner: the person's right, on the image's left).
Landmarks = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Detection:
    boxes: tuple[Box, ...]  # all faces of the deciding pass, full-resolution coordinates
    detector: str  # the pass that decided: "haar_frontal", "haar_frontal_retry", "haar_profile", "dlib_hog", "yunet"
    chosen: Box | None  # the face to crop, or None (see ``reason``)
    reason: str | None  # None, "no_face" or "multiple_faces"
    # Per box, in the same order: its 5 landmarks and its score (0..1), from detectors that give them;
    # None from those that do not (Haar, HOG).
    landmarks: tuple[Landmarks, ...] | None = None
    scores: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("landmarks", "scores"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.boxes):
                raise ValueError(f"{len(values)} {name} for {len(self.boxes)} boxes")

    def landmarks_of(self, box: Box | None) -> Landmarks | None:
        """The landmarks of ``box`` (one of :attr:`boxes`), or None where the detector gives none."""
        return None if self.landmarks is None or box is None else self.landmarks[self.boxes.index(box)]

    def score_of(self, box: Box | None) -> float | None:
        """The score of ``box`` (one of :attr:`boxes`), or None where the detector gives none."""
        return None if self.scores is None or box is None else self.scores[self.boxes.index(box)]

    def in_photo_order(self) -> Detection:
        """The same detection, its faces sorted by box (left to right, then top to bottom).

        The detectors return faces in scan or score order, which differs between passes; photo order
        makes "face 2" of a photo the same face to the app and to the index.
        """
        order = sorted(range(len(self.boxes)), key=lambda i: self.boxes[i])

        def pick(values):
            return None if values is None else tuple(values[i] for i in order)

        return replace(self, boxes=pick(self.boxes), landmarks=pick(self.landmarks), scores=pick(self.scores))


def choose_face(
    boxes: tuple[Box, ...], detector: str, policy: str, width: int, height: int,
    landmarks: tuple[Landmarks, ...] | None = None, scores: tuple[float, ...] | None = None,
) -> Detection:  # fmt: skip
    """The detection outcome for ``boxes``: one face, none, or several resolved by ``policy``.

    ``landmarks`` and ``scores`` (per box, same order) travel with the boxes; they never decide
    which face is kept: every detector follows the same rule.
    """
    extra = {"landmarks": landmarks, "scores": scores}
    if len(boxes) == 1:
        return Detection(boxes, detector, boxes[0], None, **extra)
    if not boxes:
        return Detection(boxes, detector, None, "no_face", **extra)
    if policy == "largest":
        return Detection(boxes, detector, largest_face(boxes, width, height), None, **extra)
    return Detection(boxes, detector, None, "multiple_faces", **extra)


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
