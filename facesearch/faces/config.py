"""The crop settings, and from a photo to the face crop a model sees: detector, then crop or landmark alignment.

One :class:`FaceConfig` (``params.yaml: crop``) drives the crop stage, the
evaluation CLI and the app, so a query photo is cut exactly like the gallery.

- ``detector``: a name of :mod:`facesearch.faces.detectors` (``haar``: the report's,
  OpenCV's cascades, :mod:`facesearch.faces.haar`; ``dlib_hog``: dlib's HOG + linear
  SVM frontal detector, :mod:`facesearch.faces.dlib_hog`).
- ``align: none`` cuts a square around the box, grown by ``margin``;
  ``align: landmarks`` fits dlib's 5- or 68-point shape predictor inside the box
  and warps the face onto dlib's canonical chip (:mod:`facesearch.faces.landmarks`),
  the input dlib's recognition network was trained on.

The dlib parts need ``pip install -r requirements-face.txt`` (``dlib-bin`` and
``face_recognition_models``); they are imported only when configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facesearch.faces.detection import Box, Detection, crop_square
from facesearch.faces.detectors import DETECTORS, get_detector
from facesearch.faces.haar import DetectorConfig
from facesearch.faces.landmarks import aligned_chip

ALIGNMENTS = ("none", "landmarks")


@dataclass(frozen=True)
class FaceConfig:
    """Field names match ``params.yaml: crop`` (``haar`` is the ``crop.haar`` block)."""

    size: int = 218  # side of the crop (or aligned chip), px
    margin: float = 0.2  # align none: border around the box on each side, fraction of its side
    detector: str = "haar"  # a name of facesearch.faces.detectors: haar | dlib_hog
    align: str = "none"  # none | landmarks
    landmarks: int = 5  # align landmarks: 5- or 68-point predictor
    chip_padding: float = 0.25  # align landmarks: border around the landmark face, fraction (dlib's default)
    hog_upsample: int = 1  # dlib_hog: upsamplings before scanning (each halves the smallest face found)
    hog_max_side: int = 1024  # dlib_hog: scan a copy no larger than this, px (0: full size)
    # Haar passes, and the several-faces policy every detector follows (``crop.policy``).
    haar: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"crop.detector must be one of {tuple(DETECTORS)}, not {self.detector!r}")
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


def find_faces(rgb: np.ndarray, cfg: FaceConfig) -> Detection:
    """All faces the configured detector finds and the one chosen by the policy."""
    return get_detector(cfg.detector)(rgb, cfg)


def face_crop(rgb: np.ndarray, box: Box, cfg: FaceConfig) -> np.ndarray:
    """The crop of ``box`` a model sees: an aligned chip or a square around the box."""
    if cfg.align == "landmarks":
        return aligned_chip(rgb, box, cfg.landmarks, cfg.size, cfg.chip_padding)
    return crop_square(rgb, box, cfg.margin, cfg.size)
