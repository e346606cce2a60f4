"""One photo's faces as the app and the index cut them: each face with its own landmarks, in photo order."""

from __future__ import annotations

import numpy as np

from facesearch.faces import config as C
from facesearch.faces import detectors
from facesearch.faces.detection import choose_face
from facesearch.faces.yunet import ARCFACE_TEMPLATE
from facesearch.gallery import photos


def test_each_face_is_aligned_on_its_own_points_in_photo_order(monkeypatch):
    rgb = np.zeros((200, 400, 3), np.uint8)
    right, left = ARCFACE_TEMPLATE * 1.3 + np.array([220, 20]), ARCFACE_TEMPLATE + np.array([10, 30])
    faces = {(220, 20, 150, 150): right, (10, 30, 120, 120): left}
    for points in faces.values():
        for x, y in points:
            rgb[round(y) - 2 : round(y) + 3, round(x) - 2 : round(x) + 3] = 255

    def detect(image, face):  # a detector with landmarks, its faces in score order (right one first)
        boxes = tuple(faces)
        return choose_face(boxes, "fake", face.policy, 400, 200, tuple(tuple(map(tuple, faces[b])) for b in boxes))

    monkeypatch.setitem(detectors.DETECTORS, "fake", detect)
    monkeypatch.setattr(C, "WITH_LANDMARKS", frozenset({"fake"}))
    settings = C.FaceConfig(detector="fake", align="arcface", size=112)
    detection = photos.detect(rgb, settings)
    assert detection.boxes == tuple(sorted(faces))  # photo order, points moved with their boxes
    chips = photos.crops(rgb, detection, settings)
    assert chips.shape == (2, 112, 112, 3)
    for chip in chips:  # each face's own five points land on the template
        for x, y in ARCFACE_TEMPLATE:
            assert chip[round(y), round(x)].min() > 100
