"""Tensor-side input transforms: a uint8 batch becomes what the networks read.

Each crop is decoded once, by the ``pack`` stage (:mod:`facesearch.packing`),
into a uint8 array (N x S x S x 3) at the largest input side S the pipeline's
backbones read; resizing and normalisation then run on whole batches as tensor
operations, on the GPU when there is one. Every path into a network (train,
embed, ``python -m facesearch evaluate``, the app, the index) goes through
:func:`to_model_input`, so they all see the same pixels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# torchvision's ImageNet statistics: the pretrained trunks expect them, and
# dlib_resnet's input layer maps them back onto dlib's own normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _normaliser(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors on ``device``, made once: a fresh host->GPU copy per batch blocks."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def to_model_input(
    batch: torch.Tensor, size: int, device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, size, size) on ``device``.

    The uint8 batch is moved first (4x fewer bytes than float), then converted.
    """
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = _normaliser(x.device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
