"""From a photo to the face crop a model sees: detector, then crop or landmark alignment.

One :class:`FaceConfig` (``params.yaml: crop``) drives the crop stage, the
evaluation CLI and the app, so a query photo is cut exactly like the gallery.

- ``detector: haar`` (the report's, OpenCV's cascades, :mod:`facesearch.detect`)
  or ``dlib_hog`` (dlib's HOG + linear SVM frontal detector).
- ``align: none`` cuts a square around the box, grown by ``margin``;
  ``align: landmarks`` fits dlib's 5- or 68-point shape predictor inside the box
  and warps the face onto dlib's canonical chip (``dlib.get_face_chip``: eyes,
  nose and mouth at fixed positions, ``chip_padding`` around them), the input
  dlib's recognition network was trained on.

The dlib parts need ``pip install -r requirements-face.txt`` (``dlib-bin`` and
``face_recognition_models``); they are imported only when configured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np

from facesearch.faces.haar import Box, Detection, DetectorConfig, choose_face, crop_square, detect_face

DETECTORS = ("haar", "dlib_hog")
ALIGNMENTS = ("none", "landmarks")


@dataclass(frozen=True)
class FaceConfig:
    """Field names match ``params.yaml: crop`` (``haar`` is the ``crop.haar`` block)."""

    size: int = 218  # side of the crop (or aligned chip), px
    margin: float = 0.2  # align none: border around the box on each side, fraction of its side
    detector: str = "haar"  # haar | dlib_hog
    align: str = "none"  # none | landmarks
    landmarks: int = 5  # align landmarks: 5- or 68-point predictor
    chip_padding: float = 0.25  # align landmarks: border around the landmark face, fraction (dlib's default)
    hog_upsample: int = 1  # dlib_hog: upsamplings before scanning (each halves the smallest face found)
    hog_max_side: int = 1024  # dlib_hog: scan a copy no larger than this, px (0: full size)
    # Haar passes, and the several-faces policy every detector follows (``crop.policy``).
    haar: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"crop.detector must be one of {DETECTORS}, not {self.detector!r}")
        if self.align not in ALIGNMENTS:
            raise ValueError(f"crop.align must be one of {ALIGNMENTS}, not {self.align!r}")
        if self.landmarks not in (5, 68):
            raise ValueError(f"crop.landmarks must be 5 or 68, not {self.landmarks!r}")
        if self.policy not in ("largest", "single"):
            raise ValueError(f"crop.policy must be largest or single, not {self.policy!r}")

    @classmethod
    def from_params(cls, crop: dict) -> FaceConfig:
        """From ``params.yaml: crop``; other keys of that block (jpeg_quality, n_jobs, ...) are ignored."""
        fields = {k: crop[k] for k in cls.__dataclass_fields__ if k in crop and k != "haar"}
        haar = dict(crop.get("haar") or {})
        if "policy" in crop:
            haar["policy"] = crop["policy"]
        return cls(**fields, haar=DetectorConfig.from_params(haar))

    @property
    def policy(self) -> str:
        """Several faces: largest (keep the largest, most central) | single (reject)."""
        return self.haar.policy

    @property
    def alignment(self) -> str:
        """The manifest's ``align`` value: ``none``, ``landmarks_5`` or ``landmarks_68``."""
        return "none" if self.align == "none" else f"landmarks_{self.landmarks}"


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise RuntimeError(
            "crop.detector dlib_hog and crop.align landmarks need dlib: pip install -r requirements-face.txt"
        ) from exc
    return dlib


@functools.cache
def hog_detector():
    """dlib's frontal face detector, loaded once per process (joblib workers reuse it)."""
    return _dlib().get_frontal_face_detector()


@functools.cache
def shape_predictor(points: int):
    from facesearch.faces.dlib_models import SHAPE_PREDICTORS, find_model_file

    return _dlib().shape_predictor(str(find_model_file(SHAPE_PREDICTORS[points])))


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


def find_faces(rgb: np.ndarray, cfg: FaceConfig) -> Detection:
    """All faces the configured detector finds and the one chosen by the policy."""
    if cfg.detector == "dlib_hog":
        return detect_hog(rgb, cfg.hog_upsample, cfg.policy, cfg.hog_max_side)
    return detect_face(rgb, cfg.haar)


def aligned_chip(rgb: np.ndarray, box: Box, points: int, size: int, padding: float) -> np.ndarray:
    """dlib's landmark-aligned chip of the face in ``box`` (uint8, size x size x 3).

    ``rgb`` is the full-resolution photo and ``box`` in its coordinates (:func:`detect_hog`
    maps the boxes of its downscaled copy back), so the landmarks and the chip come from every
    pixel of the photo, as in dlib's own ``compute_face_descriptor``.
    """
    dlib = _dlib()
    x, y, w, h = box
    rgb = np.ascontiguousarray(rgb)
    shape = shape_predictor(points)(rgb, dlib.rectangle(int(x), int(y), int(x + w - 1), int(y + h - 1)))
    return np.asarray(dlib.get_face_chip(rgb, shape, size=size, padding=padding))


def face_crop(rgb: np.ndarray, box: Box, cfg: FaceConfig) -> np.ndarray:
    """The crop of ``box`` a model sees: an aligned chip or a square around the box."""
    if cfg.align == "landmarks":
        return aligned_chip(rgb, box, cfg.landmarks, cfg.size, cfg.chip_padding)
    return crop_square(rgb, box, cfg.margin, cfg.size)
