"""dlib's landmarks: its chip (``align: landmarks``), and the ArcFace points for detectors without landmarks.

dlib's 5- or 68-point shape predictor is fitted inside a detector's box and the face warped onto
``dlib.get_face_chip`` (eyes, nose and mouth at fixed positions, ``chip_padding`` around them), the
input dlib's recognition network was trained on. The predictors were trained on boxes of dlib's
HOG detector: in another detector's box (a YuNet box, measured on celeba-dev's validation
identities) the points land elsewhere and dlib's network loses 0.03-0.05 LOO mAP (issue 28: YuNet
box + 68 points + dlib ResNet, LOO mAP 0.9012 against 0.9349 on HOG boxes): keep ``dlib_resnet``'s
``align: landmarks`` chips on ``crop.detector: dlib_hog``.

:func:`arcface_points` gives the 5 points of the ArcFace template (eye centres, nose tip, mouth
corners) from the 68-point predictor, for ``align: arcface`` on a detector that locates none
itself (``dlib_hog``): SFace on such chips scored val LOO mAP 0.9470 on celeba-dev, against 0.9434
on YuNet's own points (issue 28). Needs ``pip install -r requirements-face.txt`` (``dlib-bin`` and
``face_recognition_models``); dlib is imported on first use.
"""

from __future__ import annotations

import functools

import numpy as np

from facesearch.faces.detection import Box
from facesearch.faces.dlib_models import SHAPE_PREDICTORS, find_model_file, import_dlib


@functools.cache
def shape_predictor(points: int):
    return import_dlib().shape_predictor(str(find_model_file(SHAPE_PREDICTORS[points])))


# The 68-point (iBUG 300-W) indices of the ArcFace template's points, in facesearch.data.manifest.LANDMARKS
# order: the eye centres are the means of the eyes' six contour points; the person's right eye (36-41) is on
# the image's left, as the template's first point.
RIGHT_EYE, LEFT_EYE = range(36, 42), range(42, 48)
NOSE_TIP, RIGHT_MOUTH, LEFT_MOUTH = 30, 48, 54


def fitted_shape(rgb: np.ndarray, box: Box, points: int):
    """dlib's ``points``-point shape predictor fitted inside ``box`` of the full-resolution photo."""
    dlib = import_dlib()
    x, y, w, h = box
    return shape_predictor(points)(np.ascontiguousarray(rgb), dlib.rectangle(int(x), int(y), int(x + w - 1),
                                                                              int(y + h - 1)))  # fmt: skip


def arcface_points(rgb: np.ndarray, box: Box) -> np.ndarray:
    """The 5 ArcFace-template points (5, 2) of the face in ``box``, from dlib's 68-point predictor."""
    shape = fitted_shape(rgb, box, 68)
    pts = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float64)
    return np.stack([pts[list(RIGHT_EYE)].mean(0), pts[list(LEFT_EYE)].mean(0), pts[NOSE_TIP], pts[RIGHT_MOUTH],
                     pts[LEFT_MOUTH]])  # fmt: skip


def aligned_chip(rgb: np.ndarray, box: Box, points: int, size: int, padding: float) -> np.ndarray:
    """dlib's landmark-aligned chip of the face in ``box`` (uint8, size x size x 3).

    ``rgb`` is the full-resolution photo and ``box`` in its coordinates (:func:`facesearch.faces.dlib_hog.detect_hog`
    maps the boxes of its downscaled copy back), so the landmarks and the chip come from every
    pixel of the photo, as in dlib's own ``compute_face_descriptor``.
    """
    rgb = np.ascontiguousarray(rgb)
    return np.asarray(import_dlib().get_face_chip(rgb, fitted_shape(rgb, box, points), size=size, padding=padding))
