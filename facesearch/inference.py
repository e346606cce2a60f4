"""Batched inference: embeddings of a packed uint8 array, in eval mode."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from facesearch.transforms import to_model_input


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
