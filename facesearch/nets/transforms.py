"""Tensor-side input transforms: a uint8 batch becomes what the networks read.

Each crop is decoded once, by the ``pack`` stage (:mod:`facesearch.data.packing`),
into a uint8 array (N x S x S x 3) at the largest input side S the pipeline's
backbones read; resizing and normalisation then run on whole batches as tensor
operations, on the GPU when there is one. Every path into a network (train,
embed, ``python -m facesearch evaluate``, the app, the index) goes through
:func:`to_model_input`, so they all see the same pixels.
"""

from __future__ import annotations

import functools

import numpy as np
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
    mean, std = _normaliser(x.device)
    return resized((resized(x, size) - mean) / std, size, channels_last)


def resized(x: torch.Tensor, size: int, channels_last: bool = False) -> torch.Tensor:
    """A float (N, 3, H, W) batch at ``size`` x ``size``: bilinear with antialiasing, as every input is resized.

    Linear, so it commutes with the per-channel normalisation: a batch normalised at the
    arrays' own side and resized here is the batch :func:`to_model_input` would give at
    ``size`` (distillation augments one view at the arrays' side and gives each network it
    resized this way).
    """
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# dlib's jitter_image (dlib/image_transforms/interpolation.h, what compute_face_descriptor's
# num_jitters averages over): the chip seen again through a view 3 px inside each edge of a 150 px
# chip, rotated up to 3 degrees, zoomed out so the face fills 0.97-1 of it, shifted up to 2% of its
# side, and mirrored half the time; outside the photo is black.
JITTER_INSET = 6 / 150  # the view's side is (1 - this) of the chip's before the zoom
JITTER_MAX_DEGREES = 3.0
JITTER_FILL = (0.97, 0.99999)
JITTER_SHIFT = 0.02
# Fixed, not a param: jitter j is the same warp for every photo on every path (embed stage, app,
# index, evaluate), so an embedding does not depend on which batch or process made it; the first k
# warps of n jitters are k jitters' warps.
JITTER_SEED = 0


@functools.cache
def jitter_thetas(n: int) -> np.ndarray:
    """(n, 2, 3) ``F.affine_grid`` matrices of dlib-style jitters: output pixel -> input pixel, in [-1, 1] units."""
    rng = np.random.default_rng(JITTER_SEED)
    out = np.zeros((n, 2, 3))
    for j in range(n):
        shift = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, size=2) * (1 - JITTER_INSET) * 2  # [-1, 1] spans 2
        scale = (1 - JITTER_INSET) / rng.uniform(*JITTER_FILL)
        angle = np.deg2rad(rng.uniform(-JITTER_MAX_DEGREES, JITTER_MAX_DEGREES))
        flip = -1.0 if rng.random() > 0.5 else 1.0
        cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
        out[j] = [[cos * flip, -sin, shift[0]], [sin * flip, cos, shift[1]]]
    return out


def jittered(x: torch.Tensor, n: int):
    """The ``n`` dlib-style jitters of a normalised batch (:func:`jitter_thetas`), one batch at a time.

    Bilinear resampling; pixels from outside the input are black, as dlib fills them.
    """
    if n <= 0:
        return
    mean, std = _normaliser(x.device)
    black = (-mean / std).to(x.dtype)
    thetas = torch.from_numpy(jitter_thetas(n)).to(x.device, x.dtype)
    for theta in thetas:
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        yield F.grid_sample(x - black, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + black
