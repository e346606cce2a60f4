"""What a backbone file builds, and the ImageNet weights of the torchvision ones.

A backbone is one file with ``build(pretrained, embedding_dim) -> Backbone``, registered by name in
:data:`facesearch.nets.models.BACKBONES` (with its defaults in ``BACKBONE_DEFAULTS``); ``get_model``
puts the report's head on it (or the backbone's own, :attr:`Backbone.head`).

ImageNet weights come through torchvision's weights API and its cache
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``).
Where they are neither cached nor downloadable, :class:`WeightsUnavailable`
names the exact file and folder to put it in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not cached and could not be downloaded."""


@dataclass
class Backbone:
    features: nn.Module  # image -> feature map with `channels` channels
    channels: int
    head: nn.Module | None = None  # the backbone's own embedding head; None: the report's head


def weights_cache_path(weights: tvm.WeightsEnum) -> Path:
    """Where torchvision looks for (and downloads) ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_pretrained_state_dict(name: str, weights: tvm.WeightsEnum) -> dict:
    """Load torchvision weights from its cache, downloading them if possible."""
    path = weights_cache_path(weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # no network, proxy, truncated cache file, ...
        raise WeightsUnavailable(
            f"ImageNet weights for {name} ({weights}) are not in torchvision's cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). Download {weights.url} and save it as {path} "
            f"(the folder is $TORCH_HOME/hub/checkpoints), or set weights: none in params.yaml."
        ) from exc
