"""Batched inference: embeddings of a packed uint8 array, in eval mode.

The one function every path embeds with (train's validation, the embed stage, ``evaluate``,
the photo index and the app), so a model's test-time augmentation (``config.flip_tta``,
``config.tta_jitters``) applies everywhere or nowhere.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from facesearch.nets.transforms import jittered, to_model_input


def with_tta(model: torch.nn.Module, x: torch.Tensor, config) -> torch.Tensor:
    """``model``'s float embeddings of the normalised batch ``x`` under ``config``'s test-time augmentation.

    With ``config.flip_tta`` each row is the mean of the face's and its mirror image's
    embeddings, and with ``config.tta_jitters`` N also of its N dlib-style jitters
    (:func:`facesearch.nets.transforms.jittered`); L2-normalised again when the model normalises
    (a mean of unit vectors is shorter). Each view is one more forward pass. A fused model's
    members (:mod:`facesearch.nets.fused`) apply their own through this too.
    """
    emb, views = model(x).float(), 1
    if config.flip_tta:
        emb, views = emb + model(x.flip(-1)).float(), views + 1  # dim -1: the width in NCHW and NHWC alike
    for view in jittered(x, config.tta_jitters):
        emb, views = emb + model(view).float(), views + 1
    if views > 1:
        emb = emb / views
        if config.normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
    return emb


@torch.no_grad()
def embed_array(
    model: torch.nn.Module, images: np.ndarray, size: int, device: torch.device, batch: int = 128,
    amp: bool = True, channels_last: bool = False, desc: str | None = None,
) -> np.ndarray:  # fmt: skip
    """Embeddings (N, d) float32 of a uint8 (N, H, W, 3) array, in eval mode, batched, with the
    model's test-time augmentation (:func:`with_tta`)."""
    was_training = model.training
    model.eval()
    out = []
    use_amp = amp and device.type == "cuda"
    config = model.module.config if hasattr(model, "module") else model.config
    for start in tqdm(range(0, len(images), batch), desc=desc, disable=desc is None, unit="batch"):
        # np.array copies the read-only memory-mapped slice into a writable buffer torch accepts.
        x = to_model_input(torch.from_numpy(np.array(images[start : start + batch])), size, device,
                           channels_last)  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out.append(with_tta(model, x, config).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, config.embedding_dim), np.float32)
