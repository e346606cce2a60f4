"""Haar-cascade face detection (OpenCV's cascades): the report's detector, ``crop.detector: haar``.

Speed comes from scanning a downscaled copy: the cascade's cost grows with the
number of pixels and scales scanned, while CelebA faces are large relative to
the photo, so detecting on an image whose longer side is ``detect_side``
pixels, with a minimum face size relative to the image, loses little recall
and runs ~30x faster than the full-resolution scan with a 30 px minimum.
Crops are then cut from the full-resolution image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from facesearch.faces.detection import Box, Detection, choose_face

FRONTAL_CASCADE = "haarcascade_frontalface_default.xml"
PROFILE_CASCADE = "haarcascade_profileface.xml"
EYE_CASCADE = "haarcascade_eye_tree_eyeglasses.xml"


@dataclass(frozen=True)
class DetectorConfig:
    """Haar detector settings; the field names match ``params.yaml: crop.haar`` (``policy``: ``crop.policy``)."""

    detect_side: int = 160  # longer side of the scanned copy, px (0 = full resolution)
    scale_factor: float = 1.15  # cascade pyramid step
    min_neighbors: int = 4  # overlapping hits needed to accept a face
    min_face_frac: float = 0.15  # smallest face side as a fraction of the longer image side
    retry_detect_side: int = 256  # the finer second pass, for none or several faces
    retry_scale_factor: float = 1.1
    retry_min_neighbors: int = 3
    retry_min_face_frac: float = 0.1
    profile_detect_side: int = 256  # copy size for the profile cascade, px
    policy: Literal["single", "largest"] = "largest"  # what to do with several faces after retry
    profile_fallback: bool = True  # try the profile cascade (and its mirror) when no frontal face
    equalize: bool = True  # histogram-equalise before scanning (robust to lighting)
    verify_eyes: bool = True  # second-pass boxes must contain an eye (the looser pass finds clutter too)

    @classmethod
    def from_params(cls, params: dict | None) -> DetectorConfig:
        """From ``params.yaml: crop.haar``; a misspelt key fails instead of silently using a default."""
        params = dict(params or {})
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"params.yaml crop.haar: unknown keys {sorted(unknown)}")
        return cls(**params)


@functools.cache
def load_cascade(name: str) -> cv2.CascadeClassifier:
    """Load an OpenCV-bundled cascade once per process (joblib workers reuse it)."""
    path = cv2.data.haarcascades + name
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load Haar cascade {path}; is opencv-python-headless<5 installed?")
    return cascade


def _prepare_gray(rgb: np.ndarray, side: int, equalize: bool) -> tuple[np.ndarray, float]:
    """Grayscale copy whose longer side is at most ``side``; returns it and the scale back."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    scale = 1.0
    if side and max(h, w) > side:
        scale = max(h, w) / side
        # max(1, ...): a 12000 x 32 strip would otherwise round its short side to 0 (cv2.error).
        gray = cv2.resize(gray, (max(1, round(w / scale)), max(1, round(h / scale))), interpolation=cv2.INTER_AREA)
    if equalize:
        gray = cv2.equalizeHist(gray)
    return gray, scale


def _scan(
    cascade: cv2.CascadeClassifier,
    gray: np.ndarray,
    scale_factor: float,
    min_neighbors: int,
    min_face_frac: float,
) -> list[Box]:
    # 24 px is the frontal cascade's native window; nothing smaller can be found.
    min_side = max(24, int(max(gray.shape) * min_face_frac))
    found = cascade.detectMultiScale(
        gray, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(min_side, min_side)
    )
    return [tuple(int(v) for v in box) for box in found]


def _rescale(boxes: list[Box], scale: float) -> tuple[Box, ...]:
    return tuple((round(x * scale), round(y * scale), round(w * scale), round(h * scale)) for x, y, w, h in boxes)


def has_eye(gray: np.ndarray, box: Box) -> bool:
    """Whether the eye cascade fires in the upper part of ``box`` (``gray``: full-resolution)."""
    x, y, w, h = box
    top = gray[max(0, y) : max(0, y) + int(h * 0.65), max(0, x) : max(0, x) + w]
    if top.size == 0:
        return False
    # At 96 px box width an eye spans ~20 px: the eye cascade's native 20 px window.
    scale = 96 / max(1, w)
    top = cv2.equalizeHist(cv2.resize(top, (96, max(1, round(top.shape[0] * scale))), interpolation=cv2.INTER_AREA))
    eyes = load_cascade(EYE_CASCADE).detectMultiScale(top, scaleFactor=1.1, minNeighbors=1, minSize=(12, 12))
    return len(eyes) > 0


def detect_face(rgb: np.ndarray, cfg: DetectorConfig) -> Detection:
    """Find the one face to crop in an RGB image.

    Pass 1 scans a small ``detect_side`` copy. Exactly one face: keep it.
    Several: under ``policy == "largest"`` keep the largest at once; under the
    report's rule (``"single"``) scan again. None: scan again. The second pass
    uses a larger copy, a finer pyramid and a smaller minimum face; if it still
    finds none, the profile cascade (both orientations) is tried when enabled.
    Still not exactly one: reject, or under ``"largest"`` keep the largest.
    """
    h, w = rgb.shape[:2]
    frontal = load_cascade(FRONTAL_CASCADE)
    gray, scale = _prepare_gray(rgb, cfg.detect_side, cfg.equalize)
    found = _scan(frontal, gray, cfg.scale_factor, cfg.min_neighbors, cfg.min_face_frac)
    boxes, detector = _rescale(found, scale), "haar_frontal"
    if not boxes or (len(boxes) > 1 and cfg.policy == "single"):
        gray, scale = _prepare_gray(rgb, cfg.retry_detect_side, cfg.equalize)
        retry = (cfg.retry_scale_factor, cfg.retry_min_neighbors, cfg.retry_min_face_frac)
        boxes, detector = _rescale(_scan(frontal, gray, *retry), scale), "haar_frontal_retry"
        if not boxes and cfg.profile_fallback:
            if cfg.profile_detect_side != cfg.retry_detect_side:
                gray, scale = _prepare_gray(rgb, cfg.profile_detect_side, cfg.equalize)
            profile = load_cascade(PROFILE_CASCADE)
            found = _scan(profile, gray, *retry)
            # The profile cascade only knows faces turned one way; mirror for the other.
            gw = gray.shape[1]
            found += [(gw - x - bw, y, bw, bh) for x, y, bw, bh in _scan(profile, cv2.flip(gray, 1), *retry)]
            boxes, detector = _rescale(found, scale), "haar_profile"
        if boxes and cfg.verify_eyes:
            full = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            boxes = tuple(b for b in boxes if has_eye(full, b))
    return choose_face(boxes, detector, cfg.policy, w, h)


def detect(rgb: np.ndarray, face) -> Detection:
    """The detector interface (:mod:`facesearch.faces.detectors`): ``face`` is a FaceConfig, its ``haar`` block."""
    return detect_face(rgb, face.haar)
