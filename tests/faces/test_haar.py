from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facesearch.faces.detection import crop_square, largest_face
from facesearch.faces.haar import DetectorConfig, detect_face


def test_crop_square_centres_the_box_with_margin():
    img = np.zeros((100, 200, 3), np.uint8)
    img[40:60, 90:110] = 255  # a 20x20 white box
    crop = crop_square(img, (90, 40, 20, 20), margin=0.5, size=40)
    assert crop.shape == (40, 40, 3)
    # With margin 0.5 the box is the middle half of the crop.
    assert crop[20, 20].min() == 255 and crop[2, 2].max() == 0
    assert crop[10:30, 10:30].mean() > 200


def test_crop_square_pads_at_the_border_without_shifting():
    img = np.zeros((50, 50, 3), np.uint8)
    img[0:10, 0:10] = 200
    crop = crop_square(img, (0, 0, 10, 10), margin=0.5, size=20)
    assert crop.shape == (20, 20, 3)
    assert crop[10, 10].min() == 200  # the box centre stays at the crop centre


def test_largest_face_prefers_size_then_centre():
    boxes = ((0, 0, 50, 50), (100, 100, 20, 20))
    assert largest_face(boxes, 300, 300) == (0, 0, 50, 50)
    near_equal = ((0, 0, 50, 50), (125, 125, 51, 51))
    assert largest_face(near_equal, 300, 300) == (125, 125, 51, 51)


def test_blank_image_has_no_face():
    det = detect_face(np.full((240, 320, 3), 128, np.uint8), DetectorConfig())
    assert det.chosen is None and det.reason == "no_face" and det.boxes == ()


@pytest.fixture(scope="module")
def face_photos(sample_factory):
    root = sample_factory(identities=10, images_per_identity=4, seed=1)
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / "img_celeba").glob("*.jpg"))]


def test_policies_on_two_faces(face_photos):
    cfg = DetectorConfig()
    face = next(p for p in face_photos if detect_face(p, cfg).chosen is not None)
    big = crop_square(face, detect_face(face, cfg).chosen, margin=0.3, size=160)
    small = crop_square(face, detect_face(face, cfg).chosen, margin=0.3, size=120)
    canvas = np.full((200, 360, 3), 128, np.uint8)
    canvas[20:180, 10:170] = big
    canvas[40:160, 220:340] = small
    largest = detect_face(canvas, cfg)
    assert len(largest.boxes) == 2
    x, _, w, _ = largest.chosen
    assert x >= 10 and x + w <= 170  # the bigger face, on the left
    single = detect_face(canvas, DetectorConfig(policy="single"))
    assert single.chosen is None and single.reason == "multiple_faces"


def test_extreme_strip_does_not_crash_the_scan():
    # 12000 x 32 scaled to a 160 px long side used to round its short side to 0: cv2.error in resize.
    strip = np.full((32, 12000, 3), 128, np.uint8)
    det = detect_face(strip, DetectorConfig())
    assert det.chosen is None and det.reason == "no_face"
