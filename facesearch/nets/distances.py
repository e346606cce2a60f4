"""Squared Euclidean distances between two sets of rows: the one formula behind ranking, search and losses.

Also :func:`unit_rows`, the rows whose dot products are cosine similarities (verdicts).

||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b, a matrix product instead of |A| x |B| vector
differences. Written with operators only (but for the numpy-only ``out``), so the same
function serves numpy arrays (evaluation, search) and torch tensors (the triplet losses,
gradients included).
"""

from __future__ import annotations

import numpy as np


def squared_distances(a, b, b_sq, a_sq=None, out=None):
    """(len(a), len(b)) matrix of ||a_i - b_j||^2, from the squared row norms ``b_sq`` (and ``a_sq``).

    Without ``a_sq`` the term ||a_i||^2 is left out: it is constant along a row, so the
    result orders each row's b_j as the full distance does, and rankings skip that pass
    (it is also why those values can be negative). Callers pass the norms so that a
    gallery's are computed once, not per chunk of queries.

    The float operations are fixed, because committed models and metrics depend on their
    rounding: (``a_sq`` + ``b_sq``) - (2 a) @ b.T, or ``b_sq`` - (2 a) @ b.T; doubling is
    exact, so (2 a) @ b.T equals 2 (a @ b.T) bit for bit.

    ``out`` (numpy only): a (len(a), len(b)) buffer to write into, the same operations in
    place. A chunked caller reuses it, where a fresh matrix of hundreds of MB per chunk
    would have the kernel map and zero new pages every time.
    """
    sq = b_sq[None, :] if a_sq is None else a_sq[:, None] + b_sq[None, :]
    if out is None:
        return sq - 2 * a @ b.T
    np.matmul(2 * a, b.T, out=out)
    return np.subtract(sq, out, out=out)


def unit_rows(x: np.ndarray, atol: float = 1e-4) -> np.ndarray:
    """``x`` with every row scaled to length 1, so that a dot product of two rows is their cosine similarity.

    A threshold chosen on the dot products of raw embeddings (``train.<backbone>.normalize:
    false``, lengths of 5-9) is no cosine and meets no score of the index or the app, which
    compare unit rows. Rows of length 1 already, up to float32 rounding (a normalising model's),
    come back untouched, bit for bit: divided again, their last bits would move, and with them
    committed thresholds and metrics. A zero row stays zero; float rows keep their dtype.
    """
    x = np.asarray(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1) <= atol):
        return x
    return x / np.maximum(norms, 1e-12)
