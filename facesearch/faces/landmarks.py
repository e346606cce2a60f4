"""dlib's landmark alignment: ``crop.align: landmarks``, the face warped onto dlib's canonical chip.

dlib's 5- or 68-point shape predictor is fitted inside a detector's box and the face warped onto
``dlib.get_face_chip`` (eyes, nose and mouth at fixed positions, ``chip_padding`` around them), the
input dlib's recognition network was trained on. Needs ``pip install -r requirements-face.txt``
(``dlib-bin`` and ``face_recognition_models``); dlib is imported on first use.
"""

from __future__ import annotations

import functools

import numpy as np

from facesearch.faces.detection import Box
from facesearch.faces.dlib_models import SHAPE_PREDICTORS, find_model_file, import_dlib


@functools.cache
def shape_predictor(points: int):
    return import_dlib().shape_predictor(str(find_model_file(SHAPE_PREDICTORS[points])))


def aligned_chip(rgb: np.ndarray, box: Box, points: int, size: int, padding: float) -> np.ndarray:
    """dlib's landmark-aligned chip of the face in ``box`` (uint8, size x size x 3).

    ``rgb`` is the full-resolution photo and ``box`` in its coordinates (:func:`facesearch.faces.dlib_hog.detect_hog`
    maps the boxes of its downscaled copy back), so the landmarks and the chip come from every
    pixel of the photo, as in dlib's own ``compute_face_descriptor``.
    """
    dlib = import_dlib()
    x, y, w, h = box
    rgb = np.ascontiguousarray(rgb)
    shape = shape_predictor(points)(rgb, dlib.rectangle(int(x), int(y), int(x + w - 1), int(y + h - 1)))
    return np.asarray(dlib.get_face_chip(rgb, shape, size=size, padding=padding))
