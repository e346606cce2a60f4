"""Retrieval metrics as pure functions of embeddings and identity labels.

Identity metrics follow the re-identification convention: for each query,
rank the whole gallery by distance; Rank-k (CMC) is the share of queries with
a same-identity image among the first k; AP averages precision at the rank of
every same-identity gallery image; mAP is its mean over queries.
"""

from __future__ import annotations

import numpy as np


def exact_ranking(query: np.ndarray, gallery: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Full ranking (Q, G) of gallery indices, nearest first, by Euclidean distance.

    Uses ||q - g||^2 = ||q||^2 - 2 q.g + ||g||^2 in chunks of queries (a matrix
    product instead of Q*G vector differences); ties broken by gallery index.
    """
    query = np.asarray(query, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    g_sq = (gallery**2).sum(1)
    out = np.empty((len(query), len(gallery)), dtype=np.int64)
    for start in range(0, len(query), chunk):
        q = query[start : start + chunk]
        d2 = g_sq[None, :] - 2.0 * q @ gallery.T
        out[start : start + chunk] = np.argsort(d2, axis=1, kind="stable")
    return out


def identity_metrics(
    ranking: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Rank-k for ``ks`` and mAP from a full (Q, G) ranking."""
    query_labels = np.asarray(query_labels)
    match = np.asarray(gallery_labels)[ranking] == query_labels[:, None]  # (Q, G) bool in rank order
    n_rel = match.sum(1)
    if (n_rel == 0).any():
        raise ValueError("every query needs at least one gallery image of its identity")
    first = match.argmax(1)  # rank (0-based) of the first correct match
    out = {f"rank{k}": float((first < k).mean()) for k in ks}
    hits = np.cumsum(match, axis=1)
    ranks = np.arange(1, match.shape[1] + 1)
    ap = (np.where(match, hits / ranks, 0.0).sum(1)) / n_rel
    out["mAP"] = float(ap.mean())
    return out


def leave_one_out_metrics(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Every image queries all the others (identities with one image are skipped as queries)."""
    labels = np.asarray(labels)
    counts = {lab: int((labels == lab).sum()) for lab in np.unique(labels)}
    q_idx = np.array([i for i, lab in enumerate(labels) if counts[lab] > 1])
    if len(q_idx) == 0:
        return {**{f"rank{k}": float("nan") for k in ks}, "mAP": float("nan")}
    ranking = exact_ranking(emb[q_idx], emb)
    # Drop each query from its own ranking (it is in the gallery here).
    ranking = np.array([r[r != i] for r, i in zip(ranking, q_idx, strict=True)])
    return identity_metrics(ranking, labels[q_idx], labels, ks)
