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


def calibrate(emb: np.ndarray, labels: np.ndarray, far: float, fars, n_impostors: int, seed: int) -> dict | None:
    """:func:`threshold_record` of ``emb`` (images of identities the model never trained on).

    None when the identities give no impostor pair (fewer than two of them): there is
    nothing to choose a threshold against.
    """
    genuine, impostor = verification_scores(emb, labels, n_impostors, seed)
    if not len(impostor):
        return None
    return threshold_record(genuine, impostor, far, fars)


def open_set_identification(
    q_emb: np.ndarray, q_labels: np.ndarray, g_emb: np.ndarray, g_labels: np.ndarray, threshold: float,
    chunk: int = 1 << 24, top1=None,
) -> dict:  # fmt: skip
    """Open-set identification at ``threshold`` against a gallery of *enrolled* identities.

    A query of an enrolled identity is found when its top-1 result is of its identity and
    clears the threshold (TPIR, true-positive identification rate); a query of a stranger
    (identity not in the gallery) is answered correctly when nothing clears it (1 - FPIR).
    The similarities are computed ``chunk`` entries (queries x gallery) at a time.

    ``top1(q_emb, g_emb) -> (Q,) gallery indices``: another search's first result (e.g. the
    re-ranked one of ``evaluate.rerank``, built on this gallery); the verdict is still that
    result's plain cosine similarity against the threshold. Default: the most similar.
    """
    q_emb, g_emb = np.asarray(q_emb, np.float64), np.asarray(g_emb, np.float64)
    q_labels, g_labels = np.asarray(q_labels), np.asarray(g_labels)
    if not len(g_emb):
        raise ValueError("open-set identification needs an enrolled gallery")
    top = np.empty(len(q_emb), np.int64)
    top_sim = np.empty(len(q_emb))
    if top1 is not None:
        top[:] = top1(q_emb, g_emb)
        top_sim[:] = np.einsum("ij,ij->i", q_emb, g_emb[top])
    else:
        step = max(1, chunk // len(g_emb))
        for start in range(0, len(q_emb), step):
            sims = q_emb[start : start + step] @ g_emb.T
            # Ties at the top go to the lowest gallery index, the rule of every search backend here.
            best = np.argmax(sims, axis=1)
            top[start : start + step] = best
            top_sim[start : start + step] = sims[np.arange(len(sims)), best]
    enrolled = np.isin(q_labels, np.unique(g_labels))
    found = (g_labels[top] == q_labels) & (top_sim >= threshold)
    false_alarm = top_sim >= threshold
    return {
        "tpir": float(found[enrolled].mean()) if enrolled.any() else None,
        "fpir": float(false_alarm[~enrolled].mean()) if (~enrolled).any() else None,
        "enrolled_queries": int(enrolled.sum()),
        "stranger_queries": int((~enrolled).sum()),
        "gallery": len(g_emb),
    }


def enrolled_half(labels: np.ndarray, seed: int) -> np.ndarray:
    """The identities enrolled for open-set identification: half of those in ``labels`` (rounded down), seeded."""
    ids = np.unique(np.asarray(labels))
    return np.sort(np.random.default_rng(seed).choice(ids, size=len(ids) // 2, replace=False))


def open_set_half(
    q_emb: np.ndarray, q_labels: np.ndarray, g_emb: np.ndarray, g_labels: np.ndarray, threshold: float, seed: int,
    top1=None,
) -> dict:  # fmt: skip
    """:func:`open_set_identification` with half the identities (:func:`enrolled_half`) enrolled.

    The gallery keeps only the enrolled identities' images; every query is asked, so the
    other half's queries are strangers, whose right answer is "no match".
    """
    enrolled = enrolled_half(np.concatenate([np.asarray(q_labels), np.asarray(g_labels)]), seed)
    keep = np.isin(g_labels, enrolled)
    g_emb, g_labels = np.asarray(g_emb)[keep], np.asarray(g_labels)[keep]
    return open_set_identification(q_emb, q_labels, g_emb, g_labels, threshold, top1=top1)


# --- identification: a "no match" that holds for a gallery of any size ------------------------
#
# A verification threshold (above) bounds the share of impostor *pairs* that pass. A search of a
# stranger (someone not in the gallery) against N faces is N impostor comparisons, and it ends in
# a false match when any one of them passes: the false-positive identification rate (FPIR, NIST
# FRVT 1:N) grows with N. The threshold of an identification verdict is therefore a function of
# the gallery's size, chosen so that the FPIR stays at a target for that size.
#
# The model of it, fitted on stranger searches of calibration identities (people the model never
# trained on): each calibration image q, searched against the images of every *other* identity,
# gives impostor similarities whose mean mu_q and spread sd_q differ from image to image (some
# faces look like many people). Standardised, z = (s - mu_q) / sd_q, their exceedance S(z) is
# pooled over all queries: empirical in its body, a generalised Pareto tail (peaks over threshold,
# Pickands-Balkema-de Haan) beyond, where pairs run out. A stranger like q then passes a search
# of N faces at threshold t with probability 1 - (1 - S((t - mu_q) / sd_q))^N, and
#
#     FPIR(t, N) = mean over q of 1 - (1 - S((t - mu_q) / sd_q))^N,
#
# which :func:`identification_threshold` solves for t at the target FPIR and the gallery's N.
# Averaging over the queries keeps the hard strangers hard (a single pooled pair rate would
# spread their risk over everyone and understate the FPIR at large N).

IDENTIFICATION_QUERIES = 1000  # calibration images searched as strangers (a seeded subsample above this)
IDENTIFICATION_COHORT = 10000  # images each is compared with (a seeded subsample above this)
TAIL_SHARE = 0.005  # the pooled scores above the tail threshold u: the top half percent ...
TAIL_MIN, TAIL_MAX = 50, 20000  # ... but at least and at most this many exceedances for the Pareto fit
BODY_POINTS = 64  # points of the empirical exceedance curve below u kept in the record


def stranger_scores(
    emb: np.ndarray, labels: np.ndarray, seed: int, max_queries: int = IDENTIFICATION_QUERIES,
    max_cohort: int = IDENTIFICATION_COHORT, per_query: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(mu, sd, pooled z): per stranger query its impostor similarities' mean and spread, and all of
    them standardised by those, pooled and sorted in descending order.

    ``emb``: L2-normalised embeddings of the calibration images; ``labels`` their identities.
    Each query (up to ``max_queries``, seeded) is compared with every cohort image (up to
    ``max_cohort``, seeded) of another identity. ``per_query=False`` keeps raw similarities
    (mu 0, sd 1): the pooled pair model.
    """
    emb, labels = np.asarray(emb, np.float32), np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("identification calibration needs at least two identities")
    rng = np.random.default_rng(seed)
    n = len(emb)
    queries = np.sort(rng.choice(n, size=max_queries, replace=False)) if n > max_queries else np.arange(n)
    cohort = np.sort(rng.choice(n, size=max_cohort, replace=False)) if n > max_cohort else np.arange(n)
    mu, sd, pooled = [], [], []
    for start in range(0, len(queries), 256):
        q = queries[start : start + 256]
        sims = emb[q] @ emb[cohort].T
        for row, label in zip(sims, labels[q], strict=True):
            scores = row[labels[cohort] != label].astype(np.float64)
            if len(scores) < 2:
                continue
            m, s = (float(scores.mean()), float(scores.std())) if per_query else (0.0, 1.0)
            s = max(s, 1e-6)
            mu.append(m)
            sd.append(s)
            pooled.append(((scores - m) / s).astype(np.float32))
    if not pooled:
        raise ValueError("identification calibration found no stranger comparisons")
    z = np.sort(np.concatenate(pooled))[::-1]
    return np.array(mu), np.array(sd), z


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
    xi, _, sigma = genpareto.fit(exceed, floc=0.0)
    # The body: S at log-spaced levels from 1/2 down to S(u), as (score, log10 S) points.
    levels = np.geomspace(0.5, k / total, BODY_POINTS)
    scores = z[np.minimum((levels * total).astype(np.int64), total - 1)]
    body = sorted(zip(scores.tolist(), np.log10(levels).tolist(), strict=True))
    return {"u": u, "p_u": k / total, "xi": float(xi), "sigma": float(sigma), "exceedances": len(exceed),
            "body": body, "comparisons": total}  # fmt: skip


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
    t = np.atleast_1d(np.asarray(thresholds, np.float64))
    mu, sd = np.asarray(record["mu"]), np.asarray(record["sd"])
    s = exceedance((t[:, None] - mu[None, :]) / sd[None, :], record["tail"])
    # 1 - (1 - s)^N without losing small s to rounding.
    return (-np.expm1(n_gallery * np.log1p(-np.minimum(s, 1 - 1e-16)))).mean(1)


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
    emb: np.ndarray, labels: np.ndarray, fpir: float, seed: int, per_query: bool = True,
    max_queries: int = IDENTIFICATION_QUERIES, max_cohort: int = IDENTIFICATION_COHORT,
) -> dict:  # fmt: skip
    """What :func:`identification_threshold` needs, fitted on the calibration images ``emb``/``labels``.

    JSON-simple (it lives in the model file): the target ``fpir``, per-query ``mu`` and ``sd``
    (rounded to 6 digits), the pooled ``tail`` (:func:`fit_tail`), and how many queries and
    identities it rests on.
    """
    mu, sd, z = stranger_scores(emb, labels, seed, max_queries, max_cohort, per_query)
    method = "per-query standardised, Pareto tail" if per_query else "pooled pairs, Pareto tail"
    return {
        "fpir": float(fpir), "method": method, "queries": len(mu), "identities": len(np.unique(labels)),
        "images": len(labels),
        "mu": np.round(mu, 6).tolist(), "sd": np.round(sd, 6).tolist(), "tail": fit_tail(z),
    }  # fmt: skip
