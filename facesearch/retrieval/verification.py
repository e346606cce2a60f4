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

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from facesearch.nets.distances import unit_rows


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
    """Up to ``n`` distinct (i, j), i < j, of different labels, drawn with ``rng``: shape (P, 2), sorted.

    Every impostor pair when there are at most ``n``; a uniform draw of ``n`` of them otherwise.
    Terminates for every mix of labels: the number of impostor pairs is counted first, and a
    draw that would mostly hit same-label pairs (one dominant identity) draws impostor pairs
    directly instead of rejecting.
    """
    labels = np.asarray(labels)
    m = len(labels)
    total = m * (m - 1) // 2
    _, counts = np.unique(labels, return_counts=True)
    n_impostor = total - int((counts.astype(np.int64) * (counts - 1) // 2).sum())
    if n_impostor == 0 or n <= 0:
        return np.zeros((0, 2), np.int64)
    if total <= 4 * n:  # small: enumerate every pair, keep the impostors, subsample
        i, j = np.triu_indices(m, k=1)
        keep = labels[i] != labels[j]
        pairs = np.stack([i[keep], j[keep]], 1)
        if len(pairs) > n:
            pairs = pairs[np.sort(rng.choice(len(pairs), size=n, replace=False))]
        return pairs.astype(np.int64)
    if n_impostor <= 4 * n:  # few impostor pairs among many pairs: enumerate the impostors alone
        pairs = _all_impostor_pairs(labels)
        if len(pairs) > n:
            pairs = pairs[np.sort(rng.choice(len(pairs), size=n, replace=False))]
        return pairs
    seen: set[tuple[int, int]] = set()
    if 2 * n_impostor >= total:  # most pairs are impostors: draw pairs, reject the few genuine ones
        while len(seen) < n:
            a = rng.integers(m, size=2 * (n - len(seen)))
            b = rng.integers(m, size=len(a))
            for x, y in zip(a.tolist(), b.tolist(), strict=True):
                if labels[x] != labels[y] and len(seen) < n:
                    seen.add((min(x, y), max(x, y)))
        return np.array(sorted(seen), dtype=np.int64)
    # One dominant identity: draw an image by how many impostor partners it has, then a partner of
    # another label uniformly (uniform over impostor pairs). At most a quarter of draws repeat.
    order = np.argsort(labels, kind="stable")
    _, start, count = np.unique(labels[order], return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(count)), count)  # group of order[k]
    partners = (m - count[group]).astype(np.float64)
    while len(seen) < n:
        need = n - len(seen)
        k = rng.choice(m, size=need, p=partners / partners.sum())
        r = rng.integers(m - count[group[k]])  # the r-th image outside k's group
        r = r + np.where(r >= start[group[k]], count[group[k]], 0)
        for x, y in zip(order[k].tolist(), order[r].tolist(), strict=True):
            if len(seen) < n:
                seen.add((min(x, y), max(x, y)))
    return np.array(sorted(seen), dtype=np.int64)


def _all_impostor_pairs(labels: np.ndarray) -> np.ndarray:
    """Every (i, j), i < j, of different labels, sorted: built group by group, never all pairs at once."""
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    bounds = [*starts.tolist(), len(labels)]
    out = [np.zeros((0, 2), np.int64)]
    for g in range(len(starts) - 1):
        mine, rest = order[bounds[g] : bounds[g + 1]], order[bounds[g + 1] :]
        a, b = np.repeat(mine, len(rest)), np.tile(rest, len(mine))
        out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
    pairs = np.concatenate(out).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


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


def thresholds_at_fars(impostor: np.ndarray, fars) -> np.ndarray:
    """For each FAR target, the lowest similarity threshold accepting at most that share of ``impostor``.

    One sort for all targets. The threshold sits just above the first impostor that
    must be rejected (and so above all its ties); a target that allows every impostor
    gives -inf.
    """
    impostor = np.sort(np.asarray(impostor, np.float64))[::-1]
    if not len(impostor):
        raise ValueError("a threshold at a FAR needs impostor pairs")
    fars = np.atleast_1d(np.asarray(fars, np.float64))
    allowed = np.floor(fars * len(impostor) + 1e-9).astype(np.int64)  # impostors that may clear it
    out = np.full(len(fars), -np.inf)
    inside = allowed < len(impostor)
    out[inside] = np.nextafter(impostor[allowed[inside]], np.inf)
    return out


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The lowest similarity threshold at which at most ``far`` of the impostor pairs are accepted."""
    return float(thresholds_at_fars(impostor, [far])[0])


def accept_rate(scores: np.ndarray, threshold: float) -> float:
    return float((np.asarray(scores) >= threshold).mean()) if len(scores) else float("nan")


def accept_rates(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """:func:`accept_rate` at each threshold, by one sort and a binary search (NaN for no scores)."""
    scores = np.sort(np.asarray(scores, np.float64))
    thresholds = np.asarray(thresholds, np.float64)
    if not len(scores):
        return np.full(len(thresholds), np.nan)
    return (len(scores) - np.searchsorted(scores, thresholds, side="left")) / len(scores)


def resolvable(far: float, n_impostor: int) -> bool:
    """Whether ``n_impostor`` pairs can measure ``far``: at least one of them may be accepted.

    Below that the threshold still exists (above every impostor seen) but is stricter
    than the target by an unknown amount.
    """
    return far * n_impostor >= 1 - 1e-9


def far_key(far: float) -> str:
    """The metric-name form of a FAR: 0.01 -> ``1e-2``, 0.001 -> ``1e-3``."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def verification_scores(
    emb: np.ndarray, labels: np.ndarray, n_impostors: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of all genuine pairs and of ``n_impostors`` impostor pairs drawn with ``seed``.

    The pairs depend on the labels and the seed only, so two models' embeddings of
    the same images are scored on the same pairs.
    """
    rng = np.random.default_rng(seed)
    return pair_similarity(emb, genuine_pairs(labels)), pair_similarity(emb, impostor_pairs(labels, n_impostors, rng))


def roc_curve(genuine: np.ndarray, impostor: np.ndarray, points: int = 200, fars=(1e-2, 1e-3)) -> dict[str, np.ndarray]:
    """TAR at ``points`` FAR targets spread (log scale) over those the impostors resolve, plus ``fars``.

    ``far`` is the target (the measured FAR at its threshold is at most it): it depends
    on the number of impostor pairs only, so curves of models scored on the same pairs
    share their FAR axis.
    """
    n = len(impostor)
    if not n:
        raise ValueError("a ROC curve needs impostor pairs")
    lo = 1.0 / n
    grid = np.unique(np.concatenate([np.geomspace(lo, 1.0, points), np.asarray(fars, np.float64)]))
    grid = grid[grid >= lo * (1 - 1e-9)]
    thresholds = thresholds_at_fars(impostor, grid)
    return {"far": grid, "tar": accept_rates(genuine, thresholds), "threshold": thresholds}


def verification_metrics(genuine: np.ndarray, impostor: np.ndarray, fars=(1e-2, 1e-3)) -> dict:
    """ROC AUC, and TAR and threshold at each FAR (keys ``tar@far1e-3``, ``threshold@far1e-3``).

    A FAR the impostor pairs cannot resolve (:func:`resolvable`) has TAR and threshold None.
    """
    out: dict = {"roc_auc": roc_auc(genuine, impostor), "genuine_pairs": len(genuine), "impostor_pairs": len(impostor)}
    thresholds = thresholds_at_fars(impostor, fars)
    tars = accept_rates(genuine, thresholds)
    for far, t, tar in zip(fars, thresholds, tars, strict=True):
        ok = resolvable(far, len(impostor))
        out[f"tar@far{far_key(far)}"] = float(tar) if ok else None
        out[f"threshold@far{far_key(far)}"] = float(t) if ok else None
    return out


CALIBRATION_SOURCE = "validation identities"


def threshold_record(genuine: np.ndarray, impostor: np.ndarray, far: float, fars=(1e-2, 1e-3)) -> dict:
    """The verdict threshold at ``far`` and what it rests on, JSON-simple (``payload["threshold"]``).

    ``similarity`` is the threshold (a pair is the same person at ``similarity >=`` it),
    ``tar`` the share of genuine pairs it accepts, ``far_measured`` the share of impostor
    pairs; ``resolved`` is False when too few impostor pairs were drawn to measure ``far``
    (the threshold then rejects every impostor seen, stricter than asked). ``at_far`` maps
    each of ``fars`` (and ``far``), as a decimal string, to its threshold.
    """
    targets = sorted({float(f) for f in fars} | {float(far)}, reverse=True)
    thresholds = thresholds_at_fars(impostor, targets)
    t = float(thresholds[targets.index(float(far))])
    tar = accept_rate(genuine, t)
    return {
        "similarity": t,
        "far": float(far),
        "source": CALIBRATION_SOURCE,
        "tar": None if np.isnan(tar) else tar,
        "far_measured": accept_rate(impostor, t),
        "resolved": resolvable(far, len(impostor)),
        "n_genuine": len(genuine),
        "n_impostor": len(impostor),
        "at_far": {str(f): float(x) for f, x in zip(targets, thresholds, strict=True)},
    }


def calibrate(emb: np.ndarray, labels: np.ndarray, far: float, fars, n_impostors: int, seed: int,
              fpir: float | None = None, data: dict | None = None) -> dict | None:  # fmt: skip
    """The verdict record of ``emb`` (images of identities the model never trained on), or None.

    :func:`threshold_record` (the 1:1 threshold at ``far``), plus with ``fpir`` the
    ``identification`` record (:func:`identification_record`: the threshold for a search of
    any gallery size at that FPIR), plus ``data`` (what the images are: a description, whether
    synthetic). Similarities are cosines: ``emb`` is L2-normalised here whatever the model
    outputs. None when the identities give no impostor pair (fewer than two of them): there is
    nothing to choose a threshold against.
    """
    emb = unit_rows(np.asarray(emb, np.float64))
    genuine, impostor = verification_scores(emb, labels, n_impostors, seed)
    if not len(impostor):
        return None
    record = threshold_record(genuine, impostor, far, fars)
    if fpir is not None:
        record["identification"] = identification_record(emb, labels, fpir, seed)
    if data is not None:
        record["data"] = dict(data)
    return record


def enrolled_half(labels: np.ndarray, seed: int) -> np.ndarray:
    """The identities enrolled for open-set identification: half of those in ``labels`` (rounded down), seeded."""
    ids = np.unique(np.asarray(labels))
    return np.sort(np.random.default_rng(seed).choice(ids, size=len(ids) // 2, replace=False))


def open_set_galleries(labels: np.ndarray, sizes, seed: int) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """(galleries, strangers): seeded open-set galleries of the identities in ``labels``, NIST FRVT 1:N style.

    A seeded half of the identities may be enrolled (:func:`enrolled_half`), the other half are
    the strangers every gallery is searched by. Each gallery is ``(name, enrolled ids)``: for each
    of ``sizes`` smaller than the half, that many people drawn (seeded) from it, named by the
    size; then ``"all"``, the whole half.
    """
    half = enrolled_half(labels, seed)
    strangers = np.setdiff1d(np.unique(np.asarray(labels)), half)
    rng = np.random.default_rng([seed, 1])
    galleries = [(str(n), np.sort(rng.choice(half, size=n, replace=False))) for n in sizes if 0 < n < len(half)]
    return [*galleries, ("all", half)], strangers


@dataclass(frozen=True)
class Searches:
    """Open-set searches of one gallery: every mated search's best similarity and whether it was the
    right person, every non-mated (stranger) search's best similarity."""

    mated: np.ndarray  # (M,) best similarity of each search by an enrolled person's photo
    correct: np.ndarray  # (M,) bool: that best result is the searched person
    nonmated: np.ndarray  # (S,) best similarity of each search by a stranger's photo
    faces: int  # gallery size, faces


def open_set_searches(emb: np.ndarray, labels: np.ndarray, enrolled, strangers, chunk: int = 1 << 24) -> Searches:
    """Search a gallery of every photo of the ``enrolled`` people with every photo (NIST FRVT 1:N).

    A mated search is a photo of an enrolled person against the gallery without that photo
    (its other photos are there; a person with one photo gives none); a non-mated one a photo
    of one of ``strangers``. Ties at the
    top go to the lowest gallery index, the rule of every search backend here.
    """
    emb, labels = np.asarray(emb, np.float64), np.asarray(labels)
    in_gallery = np.flatnonzero(np.isin(labels, enrolled))
    if not len(in_gallery):
        raise ValueError("open-set identification needs an enrolled gallery")
    probes = np.flatnonzero(np.isin(labels, enrolled) | np.isin(labels, strangers))
    g = emb[in_gallery]
    best = np.empty(len(probes), np.int64)
    best_sim = np.empty(len(probes))
    step = max(1, chunk // len(in_gallery))
    for start in range(0, len(probes), step):
        rows = probes[start : start + step]
        sims = emb[rows] @ g.T
        sims[rows[:, None] == in_gallery[None, :]] = -np.inf  # a photo never finds itself
        top = np.argmax(sims, axis=1)
        best[start : start + step] = in_gallery[top]
        best_sim[start : start + step] = sims[np.arange(len(rows)), top]
    mated = np.isin(labels[probes], enrolled)
    # A person's only photo leaves them out of the gallery it searches: neither mated nor a stranger.
    ids, counts = np.unique(labels[in_gallery], return_counts=True)
    lone = np.isin(labels[probes], ids[counts < 2])
    keep = ~lone & np.isfinite(best_sim)
    mated, best, best_sim, probes = mated[keep], best[keep], best_sim[keep], probes[keep]
    return Searches(best_sim[mated], labels[best[mated]] == labels[probes[mated]], best_sim[~mated], len(in_gallery))


def identification_metrics(searches: Searches, threshold: float | None, fpirs=(0.01, 0.1)) -> dict:
    """TPIR at each FPIR of ``fpirs`` and FNIR/FPIR at ``threshold`` (a verdict's), NIST FRVT 1:N style.

    ``tpir@fpir1e-2``: the share of mated searches whose best result is the right person and
    clears the threshold at which at most 1% of stranger searches clear it (None when the
    strangers cannot resolve that FPIR, :func:`resolvable`). ``fnir``/``fpir``: the mated
    searches missed and the stranger searches matched at ``threshold`` (None without one).
    """
    mated, nonmated = searches.mated, searches.nonmated
    out: dict = {"faces": searches.faces, "mated": len(mated), "nonmated": len(nonmated),
                 "threshold": None if threshold is None else float(threshold)}  # fmt: skip
    if len(nonmated):
        for fpir, t in zip(fpirs, thresholds_at_fars(nonmated, fpirs), strict=True):
            ok = resolvable(fpir, len(nonmated))
            out[f"tpir@fpir{far_key(fpir)}"] = float(_tpir(searches, [t])[0]) if ok else None
    out["fnir"] = 1 - float(_tpir(searches, [threshold])[0]) if len(mated) and threshold is not None else None
    out["fpir"] = accept_rate(nonmated, threshold) if len(nonmated) and threshold is not None else None
    return out


def det_curve(searches: Searches, points: int = 200) -> dict[str, np.ndarray]:
    """FNIR at ``points`` FPIR targets (log-spaced over what the stranger searches resolve): the DET curve."""
    n = len(searches.nonmated)
    if not n or not len(searches.mated):
        raise ValueError("a DET curve needs mated and stranger searches")
    grid = np.geomspace(1.0 / n, 1.0, points)
    thresholds = thresholds_at_fars(searches.nonmated, grid)
    return {"fpir": grid, "fnir": 1 - _tpir(searches, thresholds), "threshold": thresholds}


def _tpir(searches: Searches, thresholds) -> np.ndarray:
    """Share of mated searches whose best result is the right person *and* clears each threshold."""
    right = searches.mated[searches.correct]
    if not len(right):
        return np.zeros(len(thresholds))
    return accept_rates(right, np.asarray(thresholds, np.float64)) * len(right) / len(searches.mated)


# --- identification: a "no match" that holds for a gallery of any size ------------------------
#
# A verification threshold (above) bounds the share of impostor *pairs* that pass. A search of a
# stranger (someone not in the gallery) against N faces is N impostor comparisons, and it ends in
# a false match when any one of them passes: the false-positive identification rate (FPIR, NIST
# FRVT 1:N) grows with N. The threshold of an identification verdict is therefore a function of
# the gallery's size, chosen so that the FPIR stays at a target for that size.
#
# The model of it, fitted on stranger comparisons of calibration identities (people the model
# never trained on: every image against the images of every *other* identity): their similarities'
# exceedance S(t), empirical in its body and a generalised Pareto tail (peaks over threshold,
# Pickands-Balkema-de Haan) beyond, where pairs run out, and
#
#     FPIR(t, N) = 1 - (1 - S(t))^N,
#
# which :func:`identification_threshold` solves for t at the target FPIR and the gallery's N.
# Counting every face as an independent chance is conservative where a gallery holds several
# photos of a person (a look-alike's photos pass together): on celeba-dev's validation people
# (20 to calibrate, galleries of 30 others with ~20 photos each) it predicted FPIR 0.076 where
# 0.065 happened at similarity 0.94, and 0.008 for 0.002 at 0.95. Standardising each query's
# scores by its own mean and spread first (so hard strangers stay hard) was tried there too: four
# times too conservative (TPIR 0.22 at FPIR 0.01 in a 600-face gallery, against 0.95 possible).

IDENTIFICATION_QUERIES = 1000  # calibration images searched as strangers (a seeded subsample above this)
IDENTIFICATION_COHORT = 10000  # images each is compared with (a seeded subsample above this)
TAIL_SHARE = 0.005  # the pooled scores above the tail threshold u: the top half percent ...
TAIL_MIN, TAIL_MAX = 50, 20000  # ... but at least and at most this many exceedances for the Pareto fit
BODY_POINTS = 64  # points of the empirical exceedance curve below u kept in the record
TAIL_XI_Z = 1.645  # the tail's shape is taken at its one-sided 95% upper confidence bound (see fit_tail)
TAIL_XI_MIN = -0.05  # ... and never below this (see fit_tail)


def stranger_scores(
    emb: np.ndarray, labels: np.ndarray, seed: int, max_queries: int = IDENTIFICATION_QUERIES,
    max_cohort: int = IDENTIFICATION_COHORT,
) -> np.ndarray:  # fmt: skip
    """Similarities of stranger comparisons, sorted in descending order.

    ``emb``: L2-normalised embeddings of the calibration images; ``labels`` their identities.
    Each query (up to ``max_queries``, seeded) is compared with every cohort image (up to
    ``max_cohort``, seeded) of another identity.
    """
    emb, labels = np.asarray(emb, np.float32), np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("identification calibration needs at least two identities")
    rng = np.random.default_rng(seed)
    n = len(emb)
    queries = np.sort(rng.choice(n, size=max_queries, replace=False)) if n > max_queries else np.arange(n)
    cohort = np.sort(rng.choice(n, size=max_cohort, replace=False)) if n > max_cohort else np.arange(n)
    scores = []
    for start in range(0, len(queries), 256):
        q = queries[start : start + 256]
        sims = emb[q] @ emb[cohort].T
        scores.append(sims[labels[q][:, None] != labels[cohort][None, :]])
    return np.sort(np.concatenate(scores))[::-1]


def fit_tail(z: np.ndarray) -> dict:
    """The pooled exceedance curve of descending scores ``z``: its body as points, a Pareto tail beyond u.

    ``body``: [score, log10 S(score)] from the median up to u, ascending in score; ``tail``:
    ``u`` (the score above which the fit holds), ``p_u`` (S(u)), ``xi`` and ``sigma`` of the
    generalised Pareto distribution of the exceedances ``z - u``.
    """
    from scipy.stats import genpareto

    z = np.asarray(z, np.float64)
    total = len(z)
    k = int(min(max(TAIL_SHARE * total, TAIL_MIN), TAIL_MAX, total - 1))
    if k < 10:
        raise ValueError(f"identification calibration needs more stranger comparisons than {total}")
    u = float(z[k])  # k scores lie strictly above (ties aside)
    exceed = z[:k] - u
    exceed = exceed[exceed > 0]
    body = _body(z, k)
    if len(exceed) < TAIL_MIN // 5:
        # Ties at the top (a collapsed model scores different people alike): no tail to fit. An
        # exponential of the exceedances' own scale keeps the threshold just above them.
        sigma = float(exceed.mean()) if len(exceed) else 1e-6
        return {"u": u, "p_u": k / total, "xi": 0.0, "sigma": max(sigma, 1e-6), "exceedances": len(exceed),
                "body": body, "comparisons": total}  # fmt: skip
    xi, _, _ = genpareto.fit(exceed, floc=0.0)
    # The shape, raised to its one-sided 95% upper confidence bound (standard error (1 + xi) /
    # sqrt(k)) and floored at TAIL_XI_MIN, and the scale refitted at it. Similarity tails of
    # high-dimensional embeddings are near-Gaussian, whose tail shape tends to 0 but fits
    # clearly negative at any level reachable with calibration pairs (about -1 / (2 ln(1/p)),
    # -0.1 at p = 0.005): extrapolated with that shape, the tail ends too soon and a stranger
    # searching a million faces matched 2-5x more often than promised in synthetic checks. Chosen
    # on celeba-dev's non-test identities (10 draws of 20 people to calibrate, galleries of 10 and
    # 30 others): shape unbounded, FPIR 0.024 for a promised 0.01 at ~600 faces; floored at
    # -0.05, 0.008 (TPIR 0.930); floored at 0 (an exponential tail), 0.004 (TPIR 0.906).
    xi = max(float(xi + TAIL_XI_Z * (1 + xi) / np.sqrt(len(exceed))), TAIL_XI_MIN)
    _, _, sigma = genpareto.fit(exceed, fc=xi, floc=0.0)
    return {"u": u, "p_u": k / total, "xi": float(xi), "sigma": float(sigma), "exceedances": len(exceed),
            "body": body, "comparisons": total}  # fmt: skip


def _body(z: np.ndarray, k: int) -> list[list[float]]:
    """S at log-spaced levels from 1/2 down to S(u) = k / len(z), as [score, log10 S] points, ascending."""
    levels = np.geomspace(0.5, k / len(z), BODY_POINTS)
    scores = z[np.minimum((levels * len(z)).astype(np.int64), len(z) - 1)]
    return [list(p) for p in sorted(zip(scores.tolist(), np.log10(levels).tolist(), strict=True))]


def exceedance(z: np.ndarray, tail: dict) -> np.ndarray:
    """S(z): the modelled share of (standardised) stranger comparisons at or above ``z``."""
    z = np.asarray(z, np.float64)
    body = np.asarray(tail["body"], np.float64)
    log_s = np.interp(z, body[:, 0], body[:, 1], left=0.0, right=np.log10(tail["p_u"]))
    out = np.minimum(10.0**log_s, 1.0)
    above = z > tail["u"]
    if above.any():
        y = (z[above] - tail["u"]) / tail["sigma"]
        xi = tail["xi"]
        if abs(xi) < 1e-9:
            s = np.exp(-y)
        else:
            base = 1.0 + xi * y
            s = np.where(base > 0, np.maximum(base, 1e-300) ** (-1.0 / xi), 0.0)  # xi < 0: a finite end point
        out[above] = tail["p_u"] * s
    return out


def fpir_at(record: dict, thresholds, n_gallery: int) -> np.ndarray:
    """The modelled FPIR at each similarity threshold for a gallery of ``n_gallery`` faces."""
    s = exceedance(np.atleast_1d(np.asarray(thresholds, np.float64)), record["tail"])
    # 1 - (1 - s)^N without losing small s to rounding.
    return -np.expm1(n_gallery * np.log1p(-np.minimum(s, 1 - 1e-16)))


def identification_threshold(record: dict, n_gallery: int, fpir: float | None = None) -> float:
    """The lowest similarity at which a stranger's search of ``n_gallery`` faces matches at rate ``fpir``.

    ``record``: :func:`identification_record`'s; ``fpir`` defaults to its target. Solved by
    bisection (FPIR falls as the threshold rises); an answer above every similarity the model
    can produce (1) means no search of that size can keep the promise, and 1 is returned.
    """
    target = float(record["fpir"] if fpir is None else fpir)
    n = max(int(n_gallery), 1)
    lo, hi = -1.0, 1.0 + 1e-6
    if fpir_at(record, hi, n)[0] > target:
        return hi
    for _ in range(60):  # 2 / 2^60: far below float32 resolution
        mid = (lo + hi) / 2
        if fpir_at(record, mid, n)[0] > target:
            lo = mid
        else:
            hi = mid
    return float(hi)


def identification_record(
    emb: np.ndarray, labels: np.ndarray, fpir: float, seed: int, max_queries: int = IDENTIFICATION_QUERIES,
    max_cohort: int = IDENTIFICATION_COHORT,
) -> dict:  # fmt: skip
    """What :func:`identification_threshold` needs, fitted on the calibration images ``emb``/``labels``.

    JSON-simple (it lives in the model file): the target ``fpir``, the stranger comparisons'
    ``tail`` (:func:`fit_tail`), and how many images and identities it rests on.
    """
    z = stranger_scores(emb, labels, seed, max_queries, max_cohort)
    return {"fpir": float(fpir), "method": "stranger comparisons, Pareto tail", "images": len(labels),
            "identities": len(np.unique(labels)), "tail": fit_tail(z)}  # fmt: skip


def verdict_threshold(record: dict | None, n_gallery: int, fpir: float | None = None) -> tuple[float, str] | None:
    """(similarity threshold, kind) of a model's verdict record for a gallery of ``n_gallery`` faces.

    ``kind`` "identification": the calibrated threshold at this size (:func:`identification_threshold`);
    "1:1": a record from before identification calibration, its pair threshold (which promises
    nothing about a search). None: no record.
    """
    record = record or {}
    if record.get("identification"):
        return identification_threshold(record["identification"], n_gallery, fpir), "identification"
    if record.get("similarity") is not None:
        return float(record["similarity"]), "1:1"
    return None


def open_set_report(emb: np.ndarray, labels: np.ndarray, record: dict | None, sizes, fpirs, seed: int,
                    det_points: int = 200) -> tuple[dict, dict | None]:  # fmt: skip
    """``open<gallery>_*`` metrics and the DET curve of the largest gallery (NIST FRVT 1:N), as evaluate reports.

    Galleries of ``sizes`` people and of all the enrolled half (:func:`open_set_galleries`,
    seeded), searched by every photo of their people (mated) and of the other half
    (strangers): TPIR at each of ``fpirs`` (points of the curve itself), and FNIR / FPIR at
    the verdict ``record`` gives for that gallery's size (:func:`verdict_threshold`): what a
    user of the model is told. Nothing is chosen on these people.
    """
    galleries, strangers = open_set_galleries(labels, sizes, seed)
    out, det = {}, None
    for name, enrolled in galleries:
        searches = open_set_searches(emb, labels, enrolled, strangers)
        threshold, kind = verdict_threshold(record, searches.faces) or (None, "none")
        m = identification_metrics(searches, threshold, tuple(fpirs))
        out |= {f"open{name}_{k}": v for k, v in m.items()}
        out[f"open{name}_verdict"] = kind
        if name == "all" and len(searches.nonmated) and len(searches.mated):
            det = det_curve(searches, det_points)
    return out, det
