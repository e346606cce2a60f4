"""A backbone's chips: cut from the source photos with the crop stage's recorded detection, into one uint8 array.

The crop stage detects once per photo and records the chosen face (box; from a detector that
locates them, its 5 landmarks) in the manifest. Each backbone cuts its own input from that one
detection (``params.yaml: chips.<backbone>``, :func:`facesearch.faces.config.chip_config`):
:func:`cut_chips` re-reads each photo through the crop stage's guards
(:func:`facesearch.faces.cropping.inspect_photo`: the same hardened reader and decoder, at full
resolution), checks its bytes are those the manifest hashed, cuts the chip with
:func:`facesearch.faces.config.face_crop` (the function the app, the index and the evaluate CLI
cut a query with) and stores it at the side the backbone reads (``train.<backbone>.img_size``:
downscaled with the filter :mod:`facesearch.data.packing` uses, never upscaled). No JPEG lies
between the photo and the array: the pixels are those a query gets.

Row ``i`` of the array is always row ``i`` of its split table, for every backbone. A chip that
cannot be cut (the photo is gone, unreadable or changed since the crop stage hashed it, or the
cut itself fails) does not end the run: its row is left black and counted by reason in the
array's ``.json`` (``failed``, with ``failed_rows``), and logged. So every backbone sees the same
rows; a photo changed since the crop stage also changes its hash, which re-runs crop and then
this stage under ``dvc repro``, so in a pipeline run ``failed`` stays empty.

Workers (joblib, ``execution.n_jobs``) each fill their own rows of a memory-mapped ``.npy``, so the
bytes are the same for any number of workers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image
from tqdm import tqdm

from facesearch.data import manifest as M
from facesearch.data.packing import info_path, packed_side
from facesearch.faces.config import FaceConfig, chip_record, face_crop
from facesearch.faces.cropping import CropLimits, inspect_photo
from facesearch.faces.detection import Box, Landmarks
from facesearch.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

# Rows one worker task cuts: each is a full photo decode, so fewer than packing's crops.
CHUNK = 64
# Why a chip could not be cut (the array's .json counts them).
CHANGED = "changed_since_crop"  # the file's bytes are not those the manifest hashed
CUT_FAILED = "cut_failed"  # the cut raised (logged with the exception)


@dataclass(frozen=True)
class Face:
    """One manifest row's recorded detection: where the photo is and the face in it."""

    path: str  # absolute path of the source photo
    sha256: str  # its content hash, as the crop stage read it
    box: Box
    points: Landmarks | None  # the detector's 5 landmarks, or None (a detector without)


def faces_of(table: pd.DataFrame, root: str | os.PathLike) -> list[Face]:
    """The recorded detection of each (kept) row of a split table, in its order; ``root``: the data folder."""
    root = os.path.abspath(root)
    have_points = table[list(M.LANDMARK_COLUMNS)].notna().all(axis=1).to_numpy()
    points = np.stack([table[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in M.LANDMARK_COLUMNS], 1)
    boxes = np.stack([table[c].to_numpy(dtype=np.int64) for c in (M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H)], 1)
    out = []
    for i, (rel, sha) in enumerate(zip(table[M.IMAGE_PATH], table[M.SHA256], strict=True)):
        pts = tuple((float(x), float(y)) for x, y in points[i].reshape(5, 2)) if have_points[i] else None
        out.append(Face(os.path.join(root, rel), str(sha), tuple(int(v) for v in boxes[i]), pts))
    return out


def cut_chip(face: Face, cfg: FaceConfig, side: int, limits: CropLimits) -> tuple[np.ndarray | None, str | None]:
    """(chip at ``side`` px, None), or (None, why not): one photo's chip for ``cfg``, never raising."""
    row: dict = {}
    try:
        image = inspect_photo(face.path, limits, row)
        if image is None:
            return None, str(row.get(M.REASON) or M.Reason.UNREADABLE.value)
        if row[M.SHA256] != face.sha256:
            return None, CHANGED
        chip = face_crop(image.rgb, face.box, cfg, face.points)
        if chip.shape[0] != side:
            chip = np.asarray(Image.fromarray(chip).resize((side, side), Image.Resampling.BILINEAR))
        return chip, None
    except Exception as exc:  # the point: one photo never ends the run
        log.warning("%s: cutting its chip failed (%s: %s); its row stays black", face.path, type(exc).__name__, exc)
        return None, CUT_FAILED


def _cut_rows(out: str, start: int, faces: Sequence[Face], cfg: FaceConfig, side: int, limits: CropLimits) -> dict:
    """Worker: cut ``faces`` into rows ``start...`` of the memory-mapped array; {row: reason} of the failures."""
    cv2.setNumThreads(1)  # one process per core already
    arr = np.load(out, mmap_mode="r+")
    failed = {}
    for i, face in enumerate(faces):
        chip, reason = cut_chip(face, cfg, side, limits)
        if chip is None:
            failed[start + i] = reason
        else:
            arr[start + i] = chip
    arr.flush()
    del arr
    return failed


def cut_chips(
    faces: Sequence[Face], out: str | os.PathLike, cfg: FaceConfig, img_size: int, limits: CropLimits,
    n_jobs: int = 1, desc: str = "chips",
) -> dict:  # fmt: skip
    """Cut every face's chip into one uint8 ``.npy`` at ``out`` (N, side, side, 3); returns its info.

    ``side`` is ``min(cfg.size, img_size)``. ``out`` and its ``.json`` (:func:`facesearch.data.packing.read_info`:
    rows, crop_side = the chip's ``cfg.size``, side, plus ``face``: the cut, :func:`chip_record`,
    and ``failed`` / ``failed_rows``) appear whole or not at all.
    """
    out = Path(out)
    n, side = len(faces), packed_side(cfg.size, img_size)
    failed: dict[int, str] = {}
    with atomic_path(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
        del arr  # zeros: a failed row stays black; the workers open it themselves
        chunks = [(s, faces[s : s + CHUNK]) for s in range(0, n, CHUNK)]
        jobs = (delayed(_cut_rows)(str(tmp.absolute()), s, chunk, cfg, side, limits) for s, chunk in chunks)
        with tqdm(total=n, desc=desc, unit="img", disable=n < 1000) as bar:
            for done, (_, chunk) in zip(Parallel(n_jobs=n_jobs, return_as="generator")(jobs), chunks, strict=True):
                failed.update(done)
                bar.update(len(chunk))
    rows = sorted(failed)
    info = {"rows": n, "crop_side": int(cfg.size), "side": int(side), "face": chip_record(cfg),
            "failed": dict(sorted(Counter(failed.values()).items())), "failed_rows": rows}  # fmt: skip
    if rows:
        log.warning("%s: %d of %d chips could not be cut (%s); their rows are black", out, len(rows), n,
                    info["failed"])  # fmt: skip
    write_json_atomic(info_path(out), info)
    return info
