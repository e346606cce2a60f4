"""Verification ("is this the same person?") and open-set identification, as pure functions.

A gallery search always returns *someone*; whether that someone is the person
in the photo is a threshold on the cosine similarity. The threshold is chosen
at a false-accept rate (FAR) measured on impostor pairs of identities no model
was trained on, and then used unchanged wherever a verdict is given.

Conventions (one home for each):
- similarity is the cosine of L2-normalised embeddings (the dot product);
- a pair is *accepted* ("same person", a "match") when ``similarity >= threshold``;
- FAR(t) = share of impostor pairs accepted; TAR(t) = share of genuine pairs accepted;
- :func:`threshold_at_far` returns the lowest threshold whose FAR is at most the target,
  so ties at the boundary are rejected, never accepted.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def genuine_pairs(labels: np.ndarray) -> np.ndarray:
    """All (i, j), i < j, of the same label: shape (P, 2), sorted."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    out = []
    for group in np.split(order, starts[1:]):
        group = np.sort(group)
        if len(group) > 1:
            i, j = np.triu_indices(len(group), k=1)
            out.append(np.stack([group[i], group[j]], 1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int64)


def impostor_pairs(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` distinct (i, j), i < j, of different labels, drawn with ``rng``: shape (P, 2).

    With few images every impostor pair is taken instead (no duplicates either way).
    """
    labels = np.asarray(labels)
    m = len(labels)
    total = m * (m - 1) // 2
    if total == 0:
        return np.zeros((0, 2), np.int64)
    if total <= 4 * n:  # small: enumerate every pair, keep the impostors, subsample
        i, j = np.triu_indices(m, k=1)
        keep = labels[i] != labels[j]
        pairs = np.stack([i[keep], j[keep]], 1)
        if len(pairs) > n:
            pairs = pairs[np.sort(rng.choice(len(pairs), size=n, replace=False))]
        return pairs.astype(np.int64)
    seen: set[tuple[int, int]] = set()
    while len(seen) < n:
        a = rng.integers(m, size=2 * (n - len(seen)))
        b = rng.integers(m, size=len(a))
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if labels[x] != labels[y] and len(seen) < n:
                seen.add((min(x, y), max(x, y)))
    return np.array(sorted(seen), dtype=np.int64)


def pair_similarity(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair of L2-normalised embeddings."""
    emb = np.asarray(emb, dtype=np.float64)
    return np.einsum("ij,ij->i", emb[pairs[:, 0]], emb[pairs[:, 1]])


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC curve: P(genuine > impostor) + 0.5 P(tie) (Mann-Whitney U)."""
    genuine, impostor = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    if not len(genuine) or not len(impostor):
        raise ValueError("ROC AUC needs genuine and impostor pairs")
    ranks = rankdata(np.concatenate([genuine, impostor]))  # average ranks: ties count one half
    u = ranks[: len(genuine)].sum() - len(genuine) * (len(genuine) + 1) / 2
    return float(u / (len(genuine) * len(impostor)))


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The lowest similarity threshold at which at most ``far`` of the impostor pairs are accepted."""
    impostor = np.sort(np.asarray(impostor, np.float64))[::-1]
    if not len(impostor):
        raise ValueError("a threshold at a FAR needs impostor pairs")
    allowed = int(np.floor(far * len(impostor) + 1e-9))  # impostors that may clear the threshold
    if allowed >= len(impostor):
        return float(-np.inf)
    # Strictly above the first impostor that must be rejected (and above all its ties).
    return float(np.nextafter(impostor[allowed], np.inf))


def accept_rate(scores: np.ndarray, threshold: float) -> float:
    return float((np.asarray(scores) >= threshold).mean()) if len(scores) else float("nan")


def roc_curve(genuine: np.ndarray, impostor: np.ndarray, points: int = 200) -> dict[str, np.ndarray]:
    """TAR against FAR at ``points`` thresholds spread over the FARs the impostors can resolve (log scale)."""
    impostor = np.asarray(impostor, np.float64)
    lo = max(1.0 / len(impostor), 1e-6)
    fars = np.unique(np.concatenate([np.geomspace(lo, 1.0, points), [1e-3, 1e-2]]))
    fars = fars[fars >= lo]
    thresholds = np.array([threshold_at_far(impostor, f) for f in fars])
    return {
        "far": np.array([accept_rate(impostor, t) for t in thresholds]),
        "tar": np.array([accept_rate(genuine, t) for t in thresholds]),
        "threshold": thresholds,
    }


def verification_metrics(
    emb: np.ndarray, labels: np.ndarray, n_impostors: int, seed: int, fars: tuple[float, ...] = (1e-2, 1e-3)
) -> tuple[dict, dict[str, np.ndarray]]:
    """ROC AUC, TAR and threshold at each FAR over all genuine and ``n_impostors`` seeded impostor pairs.

    Returns the metrics and the ROC curve. A FAR below 1 / (impostor pairs) cannot be
    measured: its TAR and threshold are then None and ``far_resolvable`` says so.
    """
    rng = np.random.default_rng(seed)
    gen = pair_similarity(emb, genuine_pairs(labels))
    imp = pair_similarity(emb, impostor_pairs(labels, n_impostors, rng))
    out: dict = {"roc_auc": roc_auc(gen, imp), "genuine_pairs": len(gen), "impostor_pairs": len(imp)}
    for far in fars:
        key = f"{far:.0e}".replace("e-0", "e-")  # 1e-2, 1e-3
        if far * len(imp) < 1:
            out[f"tar@far{key}"] = out[f"threshold@far{key}"] = None
            continue
        t = threshold_at_far(imp, far)
        out[f"tar@far{key}"] = accept_rate(gen, t)
        out[f"threshold@far{key}"] = t
    return out, roc_curve(gen, imp)


def open_set_identification(
    q_emb: np.ndarray, q_labels: np.ndarray, g_emb: np.ndarray, g_labels: np.ndarray, threshold: float
) -> dict:
    """Open-set identification at ``threshold`` against a gallery of *enrolled* identities.

    A query of an enrolled identity is found when its top-1 result is of its identity and
    clears the threshold (TPIR, true-positive identification rate); a query of a stranger
    (identity not in the gallery) is answered correctly when nothing clears it (1 - FPIR).
    """
    q_emb, g_emb = np.asarray(q_emb, np.float64), np.asarray(g_emb, np.float64)
    sims = q_emb @ g_emb.T
    # Ties at the top go to the lowest gallery index, the rule of every search backend here.
    top = np.argmax(sims, axis=1)
    top_sim = sims[np.arange(len(q_emb)), top]
    enrolled = np.isin(q_labels, np.unique(g_labels))
    found = (np.asarray(g_labels)[top] == np.asarray(q_labels)) & (top_sim >= threshold)
    false_alarm = top_sim >= threshold
    return {
        "tpir": float(found[enrolled].mean()) if enrolled.any() else None,
        "fpir": float(false_alarm[~enrolled].mean()) if (~enrolled).any() else None,
        "enrolled_queries": int(enrolled.sum()),
        "stranger_queries": int((~enrolled).sum()),
    }
