from __future__ import annotations

import numpy as np
import torch

from facesearch.nets.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_MAX_DEGREES,
    jitter_thetas,
    jittered,
    resized,
    to_model_input,
)


def test_model_input_normalises_and_resizes():
    batch = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    x = to_model_input(batch, 4, "cpu")
    assert x.shape == (2, 3, 4, 4)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)


def test_a_normalised_batch_resized_is_the_model_input_at_that_side():
    # Distillation augments one view at the arrays' side and resizes it for teacher and student:
    # each must get the pixels it gets on every other path (resizing and normalising commute).
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8))
    direct = to_model_input(batch, 24, "cpu")
    via_teacher_side = resized(to_model_input(batch, 40, "cpu"), 24)
    assert torch.allclose(direct, via_teacher_side, atol=1e-5)
    assert resized(direct, 24, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_jitters_are_dlib_sized_fixed_and_prefixes_of_each_other():
    thetas = jitter_thetas(200)
    assert np.array_equal(jitter_thetas(5), thetas[:5])  # 5 jitters are the first 5 of 10
    linear = thetas[:, :, :2]
    det = np.linalg.det(linear)
    scale = np.sqrt(np.abs(det))
    # the view is 3 px inside a 150 px chip's edges, zoomed out to 0.97-1: at most 1/0.97 of 144/150
    assert np.all((scale > 144 / 150 - 1e-9) & (scale < 144 / 150 / 0.97 + 1e-9))
    assert 0.35 < np.mean(det < 0) < 0.65  # mirrored about half the time
    angles = np.degrees(np.arctan2(linear[:, 1, 0], linear[:, 1, 1]))
    assert np.abs(angles).max() <= JITTER_MAX_DEGREES + 1e-9 and np.abs(angles).max() > 1
    assert np.abs(thetas[:, :, 2]).max() <= 0.02 * 2 * 144 / 150 + 1e-9


def test_a_jittered_view_keeps_the_middle_and_fills_black_from_outside():
    # A uniform grey face: the middle stays grey whatever the warp, and a zoom-out past the edge is black.
    x = to_model_input(torch.full((2, 64, 64, 3), 128, dtype=torch.uint8), 64, "cpu")
    black = to_model_input(torch.zeros((1, 1, 1, 3), dtype=torch.uint8), 1, "cpu")[0, :, 0, 0]
    views = list(jittered(x, 20))
    assert len(views) == 20 and all(v.shape == x.shape for v in views)
    for v in views:
        assert torch.allclose(v[:, :, 16:48, 16:48], x[:, :, 16:48, 16:48], atol=1e-4)
    # where a view's pixel comes from outside the face (a rotated corner), it is black, as in dlib
    outside = 0
    for v, theta in zip(views, torch.from_numpy(jitter_thetas(20)).float(), strict=True):
        grid = torch.nn.functional.affine_grid(theta[None], [1, 3, 64, 64], align_corners=False)[0]
        far = (grid.abs() > 1 + 1.5 / 64).any(-1)  # over a pixel outside: clear of the bilinear blend
        outside += int(far.sum())
        assert torch.allclose(v[0][:, far], black[:, None].expand(3, int(far.sum())), atol=1e-4)
    assert outside > 0
    assert list(jittered(x, 0)) == []
