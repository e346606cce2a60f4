"""FaceConfig from params.yaml: detection (crop) and chip (chips.<backbone>) apart, one policy, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from facesearch.faces import config as C
from facesearch.faces.config import FaceConfig, chip_config, display_config, face_crop
from facesearch.faces.yunet import ARCFACE_TEMPLATE, YuNetConfig


def test_policy_is_read_once_and_drives_the_haar_passes():
    cfg = FaceConfig.from_params({"policy": "single", "haar": {"detect_side": 200}, "jpeg_quality": 95})
    assert cfg.policy == cfg.haar.policy == "single"
    assert cfg.haar.detect_side == 200
    assert FaceConfig().policy == "largest"
    assert cfg.align == "none" and cfg.yunet == YuNetConfig()


@pytest.mark.parametrize("params,match", [({"policy": "first"}, "policy"), ({"align": "eyes"}, "align"),
                                          ({"landmarks": 7}, "landmarks"), ({"size": 0}, "size"),
                                          ({"yunet": {"score": 0.5}}, "unknown keys"),
                                          ({"yunet": {"model": "yolo"}}, "yunet.model")])  # fmt: skip
def test_bad_values_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        FaceConfig.from_params(params)


CROP = {"size": 218, "margin": 0.2, "detector": "yunet", "policy": "single", "jpeg_quality": 95,
        "yunet": {"score_threshold": 0.7}, "haar": {"detect_side": 200}}  # fmt: skip
PARAMS = {"crop": CROP, "chips": {"a": {"align": "arcface", "size": 112}, "b": {"align": "none", "size": 64,
                                                                                "margin": 0.1}}}  # fmt: skip


def test_chip_config_joins_the_detection_and_the_backbone_cut():
    a, b = chip_config(PARAMS, "a"), chip_config(PARAMS, "b")
    for cfg in (a, b):  # one detection for both
        assert cfg.detector == "yunet" and cfg.policy == "single" and cfg.yunet.score_threshold == 0.7
        assert cfg.haar.detect_side == 200
    assert (a.align, a.size) == ("arcface", 112)
    assert (b.align, b.size, b.margin) == ("none", 64, 0.1)
    display = display_config(CROP)  # the crop stage's: the detection and the square display crop
    assert (display.align, display.size, display.margin, display.detector) == ("none", 218, 0.2, "yunet")


def test_chip_config_refuses_a_missing_block_and_unknown_keys():
    with pytest.raises(ValueError, match=r"no chips\.c block"):
        chip_config(PARAMS, "c")
    with pytest.raises(ValueError, match="unknown keys"):
        chip_config({**PARAMS, "chips": {"a": {"align": "none", "detector": "haar"}}}, "a")


@pytest.mark.parametrize("key", C.MOVED_TO_CHIPS)
def test_the_old_crop_keys_fail_with_where_they_went(key):
    with pytest.raises(ValueError, match=rf"crop\.{key} is gone.*chips\.<backbone>"):
        display_config({**CROP, key: "landmarks"})
    with pytest.raises(ValueError, match=rf"crop\.{key} is gone"):
        chip_config({**PARAMS, "crop": {**CROP, key: 5}}, "a")


def test_arcface_chip_aligns_on_the_detections_own_points():
    rgb = np.zeros((300, 300, 3), np.uint8)
    points = ARCFACE_TEMPLATE * 2 + 20  # a face twice the template's size at (20, 20)
    for x, y in points:
        rgb[round(y) - 2 : round(y) + 3, round(x) - 2 : round(x) + 3] = 255
    cfg = FaceConfig(detector="yunet", align="arcface", size=112)
    chip = face_crop(rgb, (20, 20, 224, 224), cfg, tuple(map(tuple, points)))
    assert chip.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert chip[round(y), round(x)].min() > 100
    with pytest.raises(ValueError, match="landmarks"):
        face_crop(rgb, (20, 20, 224, 224), cfg, None)  # a yunet detection always has them: a bug if not


def test_square_crop_ignores_points():
    rgb = np.full((100, 100, 3), 7, np.uint8)
    cfg = FaceConfig(align="none", size=32)
    assert face_crop(rgb, (10, 10, 50, 50), cfg, ((0.0, 0.0),) * 5).shape == (32, 32, 3)
