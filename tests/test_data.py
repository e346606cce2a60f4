from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facesearch.data import AugmentConfig, augment, to_model_input
from facesearch.models import IMAGENET_MEAN, IMAGENET_STD
from facesearch.packing import load_array, pack_crops


def test_pack_roundtrip_and_stale_guard(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    assert pack_crops(paths, tmp_path / "a.npy") == 3
    arr = load_array(tmp_path / "a.npy", expected_rows=3)
    assert np.array_equal(arr, imgs)
    with pytest.raises(ValueError, match="re-run pack"):
        load_array(tmp_path / "a.npy", expected_rows=4)
    Image.fromarray(imgs[0][:10]).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="expected"):
        pack_crops([paths[0], tmp_path / "odd.png"], tmp_path / "b.npy")
    assert not (tmp_path / "b.npy").exists()  # nothing half-written


def test_model_input_normalises_and_resizes():
    batch = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    x = to_model_input(batch, 4, "cpu")
    assert x.shape == (2, 3, 4, 4)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)


def test_augment_is_seeded_and_does_what_it_says():
    x = torch.randn(64, 3, 32, 32)
    cfg = AugmentConfig(flip_p=0.0, erase_p=1.0, dropout_p=0.0)
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    erased = (a == 0).all(dim=1).float().mean(dim=(1, 2))  # share of pixels erased per image
    # Area 2%..33% of the image, up to rounding of the rectangle's sides to pixels.
    assert (erased >= 0.015).all() and (erased <= 0.36).all()
    none = augment(x, AugmentConfig(flip_p=0.0, erase_p=0.0, dropout_p=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(none, x)
    flipped = augment(x, AugmentConfig(flip_p=1.0, erase_p=0.0, dropout_p=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(flipped, x.flip(-1))
    holes = augment(x, AugmentConfig(flip_p=0.0, erase_p=0.0, dropout_p=1.0, dropout_holes=3, dropout_size=0.25),
                    torch.Generator().manual_seed(2))  # fmt: skip
    dropped = (holes == 0).all(dim=1).float().mean(dim=(1, 2))
    assert (dropped > 0).all() and (dropped <= 3 * 0.25**2 + 1e-6).all()


def test_augment_keeps_channels_last():
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    out = augment(x, AugmentConfig(flip_p=1.0, erase_p=1.0, dropout_p=1.0), torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)
