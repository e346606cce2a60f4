"""One interface for every face detector: ``get_detector(name)(rgb, face) -> Detection``."""

from __future__ import annotations

import numpy as np
import pytest

from facesearch.faces import detectors, zoo
from facesearch.faces.config import FaceConfig, find_faces
from facesearch.faces.detection import Detection, choose_face
from facesearch.faces.detectors import DETECTORS, get_detector


def test_every_registered_detector_answers_a_detection_on_a_blank_photo():
    blank = np.zeros((120, 160, 3), np.uint8)
    for name in DETECTORS:
        if name == "dlib_hog":
            pytest.importorskip("dlib")
        if name == "yunet" and not zoo.available("yunet_int8bq"):
            pytest.skip(f"YuNet's file is not installed: {zoo.MODELS['yunet_int8bq'].how_to_get()}")
        found = get_detector(name)(blank, FaceConfig(detector=name))
        assert isinstance(found, Detection) and found.chosen is None and found.reason == "no_face"


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="dlib_hog"):
        get_detector("mtcnn")
    with pytest.raises(ValueError, match=r"crop\.detector"):
        FaceConfig(detector="mtcnn")


def test_a_new_detector_is_one_registry_entry(monkeypatch):
    # What a new detector file provides: detect(rgb, face), its boxes resolved by the common policy.
    def detect(rgb, face):
        return choose_face(((10, 10, 40, 40), (60, 10, 20, 20)), "fake", face.policy, rgb.shape[1], rgb.shape[0])

    monkeypatch.setitem(detectors.DETECTORS, "fake", detect)
    photo = np.zeros((100, 100, 3), np.uint8)
    assert find_faces(photo, FaceConfig(detector="fake")).chosen == (10, 10, 40, 40)
    single = FaceConfig.from_params({"detector": "fake", "policy": "single"})
    assert find_faces(photo, single).reason == "multiple_faces"


def test_landmarks_and_scores_travel_with_their_boxes():
    boxes = ((60, 10, 20, 20), (10, 10, 40, 40))
    points = (((61.0, 12.0),) * 5, ((12.0, 15.0),) * 5)
    found = choose_face(boxes, "fake", "largest", 100, 100, points, (0.8, 0.95))
    assert found.chosen == (10, 10, 40, 40)  # the largest, whatever the scores
    assert found.landmarks_of(found.chosen) == points[1] and found.score_of(found.chosen) == 0.95
    ordered = found.in_photo_order()
    assert ordered.boxes == tuple(sorted(boxes)) and ordered.landmarks == (points[1], points[0])
    assert ordered.scores == (0.95, 0.8)
    plain = choose_face(boxes, "fake", "largest", 100, 100)
    assert plain.landmarks_of(plain.chosen) is None and plain.score_of(plain.chosen) is None
    assert plain.in_photo_order().landmarks is None
    with pytest.raises(ValueError, match="1 landmarks for 2 boxes"):
        Detection(boxes, "fake", None, "no_face", landmarks=points[:1])
