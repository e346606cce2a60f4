from __future__ import annotations

import torch

from facesearch.transforms import IMAGENET_MEAN, IMAGENET_STD, to_model_input


def test_model_input_normalises_and_resizes():
    batch = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    x = to_model_input(batch, 4, "cpu")
    assert x.shape == (2, 3, 4, 4)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)
