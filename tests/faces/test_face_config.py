"""FaceConfig from params.yaml: one several-faces policy for every detector, and clear errors."""

from __future__ import annotations

import pytest

from facesearch.faces.config import FaceConfig


def test_policy_is_read_once_and_drives_the_haar_passes():
    cfg = FaceConfig.from_params({"policy": "single", "haar": {"detect_side": 200}, "jpeg_quality": 95})
    assert cfg.policy == cfg.haar.policy == "single"
    assert cfg.haar.detect_side == 200
    assert FaceConfig().policy == "largest"
    assert cfg.alignment == "none"
    assert FaceConfig.from_params({"align": "landmarks", "landmarks": 68}).alignment == "landmarks_68"


@pytest.mark.parametrize("params,match", [({"policy": "first"}, "policy"), ({"align": "eyes"}, "align"),
                                          ({"landmarks": 7}, "landmarks")])  # fmt: skip
def test_bad_values_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        FaceConfig.from_params(params)
