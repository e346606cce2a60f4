"""The face detectors, by the name ``params.yaml: crop.detector`` gives them.

A detector is one file with a ``detect(rgb, face) -> Detection`` function: ``rgb`` the photo
(uint8, H x W x 3), ``face`` the :class:`facesearch.faces.config.FaceConfig` (each detector reads
its own fields, and ``face.policy`` for several faces: :func:`facesearch.faces.detection.choose_face`),
the answer every face box in the photo's pixels and the one chosen (with each face's 5 landmarks
and score, from a detector that locates them). A new detector is a new file and a line here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from facesearch.faces import dlib_hog, haar, yunet
from facesearch.faces.detection import Detection

Detector = Callable[[np.ndarray, object], Detection]

DETECTORS: dict[str, Detector] = {
    "haar": haar.detect,  # OpenCV's Haar cascades (the report's)
    "dlib_hog": dlib_hog.detect,  # dlib's HOG + linear SVM (needs requirements-face.txt)
    "yunet": yunet.detect,  # OpenCV Zoo's YuNet CNN, 5 landmarks and a score per face (needs requirements-face.txt)
}
# Detectors whose Detection carries 5 landmarks per face (facesearch.data.manifest.LANDMARKS order).
WITH_LANDMARKS = frozenset({"yunet"})


def get_detector(name: str) -> Detector:
    """The ``detect(rgb, face)`` function of detector ``name``."""
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown face detector {name!r}; choose from {sorted(DETECTORS)}") from None
