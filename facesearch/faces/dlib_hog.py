"""dlib's HOG + linear SVM frontal face detector: ``crop.detector: dlib_hog``.

Needs ``pip install -r requirements-face.txt`` (``dlib-bin``); dlib is imported on first use.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from facesearch.faces.detection import Detection, choose_face
from facesearch.faces.dlib_models import import_dlib


@functools.cache
def hog_detector():
    """dlib's frontal face detector, loaded once per process (joblib workers reuse it)."""
    return import_dlib().get_frontal_face_detector()


def detect_hog(rgb: np.ndarray, upsample: int, policy: str, max_side: int = 0) -> Detection:
    """dlib's HOG detector, as dlib's own pipeline runs it, on a copy no larger than ``max_side``.

    The cap matters for the odd 20-megapixel photo: upsampled once it would be 80 megapixels
    of HOG features (tens of seconds, gigabytes) for a face that is large anyway.
    """
    h, w = rgb.shape[:2]
    scale = max(h, w) / max_side if max_side and max(h, w) > max_side else 1.0
    small = cv2.resize(rgb, (round(w / scale), round(h / scale)), interpolation=cv2.INTER_AREA) if scale > 1 else rgb
    rects = hog_detector()(np.ascontiguousarray(small), upsample)
    boxes = tuple(
        (round(r.left() * scale), round(r.top() * scale), round(r.width() * scale), round(r.height() * scale))
        for r in rects
    )
    return choose_face(boxes, "dlib_hog", policy, w, h)


def detect(rgb: np.ndarray, face) -> Detection:
    """The detector interface (:mod:`facesearch.faces.detectors`): ``face`` is a FaceConfig (its ``hog_*`` fields)."""
    return detect_hog(rgb, face.hog_upsample, face.policy, face.hog_max_side)
