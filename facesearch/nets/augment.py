"""Train-time augmentation on whole batches, drawn per image from a seeded generator.

Flip, RandomErasing and region dropout as tensor operations (on the GPU when the
batch is there), configured by ``params.yaml: train.<backbone>.augment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation (``params.yaml: train.<backbone>.augment``)."""

    flip_p: float = 0.5  # horizontal flip probability
    erase_p: float = 0.5  # RandomErasing probability (as in the report)
    erase_scale: tuple[float, float] = (0.02, 0.33)  # erased area, fraction of the image
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # erased rectangle aspect ratio range
    dropout_p: float = 0.3  # region dropout probability (as in the report)
    dropout_holes: int = 6  # square holes per dropped-out image
    dropout_size: float = 0.15  # hole side, fraction of the image side


def _boxes_mask(n: int, h: int, w: int, y0, x0, bh, bw, device) -> torch.Tensor:
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    y0, x0, bh, bw = (t.view(n, 1, 1) for t in (y0, x0, bh, bw))
    return (ys >= y0) & (ys < y0 + bh) & (xs >= x0) & (xs < x0 + bw)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Batched flip, RandomErasing and region dropout, each drawn per image.

    ``x`` is a normalised (N, 3, H, W) batch; erased and dropped pixels are set
    to 0, the dataset mean after normalisation (torchvision's default value).
    ``generator`` lives on ``x``'s device, so augmentation is reproducible.
    The output keeps ``x``'s memory format: a channels-last batch turned back
    into NCHW by ``torch.where`` would make every convolution after it slower
    (1.6x per MobileNet-V2 step on CPU, measured).
    """
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    n, _, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    flip = rand(n) < cfg.flip_p
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)

    erase = rand(n) < cfg.erase_p
    area = (cfg.erase_scale[0] + rand(n) * (cfg.erase_scale[1] - cfg.erase_scale[0])) * h * w
    log_r = np.log(cfg.erase_ratio[0]) + rand(n) * (np.log(cfg.erase_ratio[1]) - np.log(cfg.erase_ratio[0]))
    ratio = torch.exp(log_r)
    bh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    bw = torch.sqrt(area / ratio).round().clamp(1, w).long()
    y0 = (rand(n) * (h - bh + 1).float()).floor().long()
    x0 = (rand(n) * (w - bw + 1).float()).floor().long()
    mask = _boxes_mask(n, h, w, y0, x0, bh, bw, dev) & erase.view(n, 1, 1)

    drop = rand(n) < cfg.dropout_p
    side = max(1, round(cfg.dropout_size * min(h, w)))
    k = cfg.dropout_holes
    if k > 0:
        hy = (rand(n * k) * (h - side + 1)).floor().long()
        hx = (rand(n * k) * (w - side + 1)).floor().long()
        full = torch.full((n * k,), side, device=dev, dtype=torch.long)
        holes = _boxes_mask(n * k, h, w, hy, hx, full, full, dev).view(n, k, h, w).any(dim=1)
        mask = mask | (holes & drop.view(n, 1, 1))
    out = x.masked_fill(mask.unsqueeze(1), 0.0)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
