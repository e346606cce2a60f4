"""Decode face crops once into a uint8 ``.npy`` array, in parallel, at the side it is used; read it back.

``python -m facesearch evaluate`` and ``calibrate`` go through :func:`pack_crops`; the pipeline's
``chips`` stage cuts its arrays from the photos (:mod:`facesearch.faces.chips`) at the same side with
the same filter, and both are read back with :func:`load_array`. The array is written through a memory map by joblib
workers, each filling its own rows, so memory stays at a chunk of images per
worker whatever the number of crops, and the bytes are the same for any
number of workers.

Crops larger than the requested side are downscaled with PIL's antialiased
bilinear filter (a triangle filter as wide as the scale factor, ``Image.resize``
with ``BILINEAR``): the filter ``facesearch.nets.transforms.to_model_input`` applies
(``F.interpolate(bilinear, antialias=True)`` reproduces PIL's, within one
grey level), so a network trained on packed arrays sees the pixels the app
and the CLI give it from a crop of ``crop.size``, and the model file's
recorded preprocessing (crop settings + ``img_size``) stays true. Crops at or
below the side are stored as they are: no resize when equal, and no upscaling,
which would add bytes and no information (``to_model_input`` upscales on the fly).

This module imports no torch: the workers stay small (~60 MB each, not ~900 MB).
Next to each ``<name>.npy`` goes ``<name>.json`` (:func:`read_info`): the side of the
crops it was packed from, which the array's own shape no longer shows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image
from tqdm import tqdm

from facesearch.io import atomic_path, write_json_atomic

# Rows one worker task decodes: large enough to amortise the task overhead,
# small enough that a worker holds only a few MB (256 crops of 218 px: 36 MB).
CHUNK = 256


def packed_side(crop_side: int, side: int | None) -> int:
    """Side of the packed images: ``side``, but never above the crops' own (no upscaling)."""
    return crop_side if side is None else min(crop_side, side)


def load_crop(path: str | os.PathLike, shape: tuple[int, int], expected: tuple[int, int] | None = None) -> np.ndarray:
    """One crop as uint8 (*shape, 3): decoded to RGB, downscaled when larger (see module doc).

    ``expected``: the crop's own (height, width); another size raises ValueError.
    """
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if expected is not None and (rgb.height, rgb.width) != tuple(expected):
        raise ValueError(f"{path}: crop is {rgb.height}x{rgb.width} px, expected {expected[0]}x{expected[1]} "
                         "like the others")  # fmt: skip
    if (rgb.height, rgb.width) != tuple(shape):
        rgb = rgb.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _crop_shape(path: str | os.PathLike) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def _pack_rows(out: str, start: int, paths: Sequence[str], crop_hw: tuple[int, int], shape: tuple[int, int]) -> int:
    """Worker: decode ``paths`` into rows ``start...`` of the memory-mapped array at ``out``."""
    arr = np.load(out, mmap_mode="r+")
    for i, path in enumerate(paths):
        arr[start + i] = load_crop(path, shape, expected=crop_hw)
    arr.flush()
    del arr
    return len(paths)


def pack_crops(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, side: int | None = None, n_jobs: int = 1,
    desc: str = "pack",
) -> int:  # fmt: skip
    """Decode ``paths`` (equal-sized RGB crops) into one uint8 ``.npy`` at ``out``; returns N.

    ``side``: store the images at most this many px on a side (None: as they are);
    a downscale needs square crops. ``n_jobs``: joblib workers (-1: one per core;
    1: in this process). ``out`` and its ``.json`` info appear whole or not at all.
    """
    out = Path(out)
    # Absolute: a reused joblib worker may sit in another working directory.
    paths = [os.path.abspath(p) for p in paths]
    n = len(paths)
    crop_hw = _crop_shape(paths[0]) if n else (1, 1)
    if side is not None and side < max(crop_hw) and crop_hw[0] != crop_hw[1]:
        raise ValueError(f"{paths[0]}: crops are {crop_hw[0]}x{crop_hw[1]} px; only square crops can be resized")
    shape = (packed_side(crop_hw[0], side),) * 2 if side is not None else crop_hw
    with atomic_path(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape, 3))
        del arr  # the workers open it themselves
        chunks = [(s, paths[s : s + CHUNK]) for s in range(0, n, CHUNK)]
        jobs = (delayed(_pack_rows)(str(tmp.absolute()), s, chunk, crop_hw, shape) for s, chunk in chunks)
        with tqdm(total=n, desc=desc, unit="img", disable=n < 1000) as bar:
            for done in Parallel(n_jobs=n_jobs, return_as="generator")(jobs):
                bar.update(done)
    # After the array: a run killed in between leaves an info that disagrees with it, which
    # facesearch.data.packing.load_array detects (rows, side), never an array passing for another.
    write_json_atomic(info_path(out), {"rows": n, "crop_side": int(crop_hw[0]) if n else None,
                                       "side": int(shape[0]) if n else None})  # fmt: skip
    return n


def info_path(array: str | os.PathLike) -> Path:
    """Where :func:`pack_crops` records how ``array`` was packed: ``<name>.json`` beside ``<name>.npy``."""
    return Path(array).with_suffix(".json")


def read_info(array: str | os.PathLike) -> dict:
    """``{"rows", "crop_side", "side"}`` of a packed array; raises if it was not written by :func:`pack_crops`."""
    path = info_path(array)
    if not path.is_file():
        raise ValueError(f"{array}: no {path.name} beside it (packed by an older version): re-run the chips stage")
    return json.loads(path.read_text())


def load_array(
    path: str | os.PathLike, expected_rows: int | None = None, crop_side: int | None = None,
    min_side: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Memory-map an array written by :func:`pack_crops`, checking it is current.

    ``expected_rows`` guards against a stale pack; ``crop_side`` (the chip size, ``chips.<backbone>.size``)
    against one packed from other crops (the array's side no longer shows it);
    ``min_side`` (the reader's ``img_size``) against one packed smaller than its
    reader needs (unless the crops themselves are smaller: then they are used as they are).
    """
    arr = np.load(path, mmap_mode="r")
    if expected_rows is not None and len(arr) != expected_rows:
        raise ValueError(f"{path} has {len(arr)} images but its table has {expected_rows} rows: re-run the chips stage")
    if (crop_side is None and min_side is None) or not len(arr):
        return arr
    info = read_info(path)
    if info["rows"] != len(arr) or info["side"] != arr.shape[1]:
        raise ValueError(f"{path} does not match its {info_path(path).name}: re-run the chips stage")
    if crop_side is not None and info["crop_side"] != crop_side:
        raise ValueError(f"{path} was packed from {info['crop_side']} px crops but its chip size is {crop_side}: "
                         "re-run the chips stage (dvc repro)")  # fmt: skip
    if min_side is not None and arr.shape[1] < min(min_side, info["crop_side"]):
        raise ValueError(f"{path} is packed at {arr.shape[1]} px, below img_size {min_side}: re-run the chips stage "
                         "(dvc repro)")  # fmt: skip
    return arr
