"""The training/serving data path: decoded crop arrays and tensor-side transforms.

Each crop is decoded once, by the ``pack`` stage (:mod:`facesearch.packing`),
into a uint8 array (N x S x S x 3) per split at the largest input side S the
pipeline's backbones read, stored as ``.npy`` and memory-mapped by readers, so
no JPEG is decoded in the training loop. Resizing, normalisation and
augmentation then run on whole batches as tensor operations, on the GPU when
there is one, so the accelerator never waits for the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facesearch.models import IMAGENET_MEAN, IMAGENET_STD


def to_model_input(
    batch: torch.Tensor, size: int, device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, size, size) on ``device``.

    The uint8 batch is moved first (4x fewer bytes than float), then converted.
    """
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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


@torch.no_grad()
def embed_array(
    model: torch.nn.Module, images: np.ndarray, size: int, device: torch.device, batch: int = 128,
    amp: bool = True, channels_last: bool = False, desc: str | None = None,
) -> np.ndarray:  # fmt: skip
    """Embeddings (N, d) float32 of a uint8 (N, H, W, 3) array, in eval mode, batched."""
    was_training = model.training
    model.eval()
    out = []
    use_amp = amp and device.type == "cuda"
    for start in tqdm(range(0, len(images), batch), desc=desc, disable=desc is None, unit="batch"):
        # np.array copies the read-only memory-mapped slice into a writable buffer torch accepts.
        x = to_model_input(torch.from_numpy(np.array(images[start : start + batch])), size, device,
                           channels_last)  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out.append(model(x).float().cpu().numpy())
    model.train(was_training)
    d = model.module.config.embedding_dim if hasattr(model, "module") else model.config.embedding_dim
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)
