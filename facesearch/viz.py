"""Small image-grid helpers for the pictures people look at (contact sheets, retrieval results)."""

from __future__ import annotations

import cv2
import numpy as np


def tile(img: np.ndarray | None, label: str, size: int, colour: tuple[int, int, int]) -> np.ndarray:
    """``img`` (RGB, any size; None: a gray blank) fitted into a ``size`` square, framed in ``colour``, captioned."""
    out = np.full((size, size, 3), 96, np.uint8)
    if img is not None:
        h, w = img.shape[:2]
        s = size / max(h, w)
        small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        y0, x0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
        out[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    cv2.rectangle(out, (0, 0), (size - 1, size - 1), colour, 3)
    cv2.rectangle(out, (0, size - 18), (size, size), (0, 0, 0), -1)
    cv2.putText(out, label[:22], (4, size - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def grid(tiles: list[np.ndarray], cols: int) -> np.ndarray:
    """Tiles (equal squares) in rows of ``cols``, on white."""
    size = tiles[0].shape[0] if tiles else 1
    rows = max(1, -(-len(tiles) // cols))
    sheet = np.full((rows * size, cols * size, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * size : (r + 1) * size, c * size : (c + 1) * size] = t
    return sheet
