"""Weights ported from another framework's file, converted once and cached by the source's hash.

dlib's ``.dat`` (:mod:`facesearch.nets.dlib_resnet`) and OpenCV Zoo's ONNX files
(:mod:`facesearch.nets.sface`) are read by our own converters into PyTorch state dicts. Converting
takes seconds, so the result is cached in torchvision's weights folder
(``$TORCH_HOME/hub/checkpoints/<source stem>.pt``), keyed by the source file's SHA-256: a new
or edited source file is converted again, never served a stale conversion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch


def converted_cache_path(source: Path) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{Path(source).stem}.pt"


def cached_conversion(source: Path, convert: Callable[[bytes], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``convert(source's bytes)``: the cached result when its source hash matches, else converted and cached."""
    from facesearch.io import atomic_path

    source = Path(source)
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cache = converted_cache_path(source)
    if cache.is_file():
        try:
            payload = torch.load(cache, map_location="cpu", weights_only=True)
            if payload.get("source_sha256") == digest:
                return payload["state_dict"]
        except Exception:  # a truncated or foreign file: convert again
            pass
    state = convert(data)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        torch.save({"source": source.name, "source_sha256": digest, "state_dict": state}, tmp)
    return state
