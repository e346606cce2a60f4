from __future__ import annotations

import torch

from facesearch.nets.augment import AugmentConfig, augment


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
