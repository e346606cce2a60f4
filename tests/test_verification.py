"""Verification metrics against brute-force definitions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from facesearch import verification as V


def clustered(n_ids: int, per_id: int, noise: float, seed: int = 0, d: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, d))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = centres[labels] + noise * rng.normal(size=(len(labels), d))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def test_pairs_are_all_genuine_and_distinct_impostors():
    labels = np.array([3, 1, 3, 2, 1, 3])
    brute = [(i, j) for i, j in itertools.combinations(range(6), 2) if labels[i] == labels[j]]
    assert V.genuine_pairs(labels).tolist() == [list(p) for p in brute]
    imp = V.impostor_pairs(labels, 100, np.random.default_rng(0))  # fewer exist: all of them
    assert sorted(map(tuple, imp.tolist())) == [
        (i, j) for i, j in itertools.combinations(range(6), 2) if labels[i] != labels[j]
    ]
    _, big = clustered(40, 5, 0.1)
    imp = V.impostor_pairs(big, 300, np.random.default_rng(1))
    assert len(imp) == 300 and len({tuple(p) for p in imp.tolist()}) == 300
    assert (imp[:, 0] < imp[:, 1]).all() and (big[imp[:, 0]] != big[imp[:, 1]]).all()
    assert np.array_equal(imp, V.impostor_pairs(big, 300, np.random.default_rng(1)))  # seeded


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    gen = np.round(rng.normal(0.6, 0.2, 50), 1)  # rounded: many ties
    imp = np.round(rng.normal(0.3, 0.2, 70), 1)
    brute = np.mean([(g > i) + 0.5 * (g == i) for g in gen for i in imp])
    assert V.roc_auc(gen, imp) == pytest.approx(brute)
    assert V.roc_auc(np.ones(3), np.zeros(4)) == 1.0


@pytest.mark.parametrize("far", [0.0, 0.01, 0.1, 0.25, 0.5, 1.0])
def test_threshold_is_the_lowest_with_far_at_most_the_target(far):
    imp = np.round(np.random.default_rng(2).normal(size=200), 1)  # ties at the boundary
    t = V.threshold_at_far(imp, far)
    assert V.accept_rate(imp, t) <= far + 1e-12
    # Brute force: no lower candidate threshold (any observed score) keeps FAR within the target.
    lower = [c for c in np.unique(imp) if c < t and (imp >= c).mean() <= far + 1e-12]
    assert not lower


def test_verification_separates_clustered_identities():
    emb, labels = clustered(30, 6, 0.3)
    gen, imp = V.verification_scores(emb, labels, n_impostors=5000, seed=0)
    m = V.verification_metrics(gen, imp)
    roc = V.roc_curve(gen, imp)
    assert m["genuine_pairs"] == 30 * 15 and m["impostor_pairs"] == 5000
    assert 0.95 < m["roc_auc"] <= 1.0
    assert 0 < m["tar@far1e-3"] <= m["tar@far1e-2"] <= 1
    assert m["threshold@far1e-3"] >= m["threshold@far1e-2"]
    assert (np.diff(roc["far"]) > 0).all() and (np.diff(roc["tar"]) >= 0).all()
    assert roc["far"][0] == pytest.approx(1 / 5000) and roc["far"][-1] == 1.0 and {1e-2, 1e-3} <= set(roc["far"])
    # Each ROC point is the TAR at the threshold of its FAR target, whose measured FAR is within it.
    for far, tar, t in zip(roc["far"], roc["tar"], roc["threshold"], strict=True):
        assert V.accept_rate(imp, t) <= far + 1e-12 and tar == V.accept_rate(gen, t)
    few_gen, few_imp = V.verification_scores(emb[:12], labels[:12], n_impostors=500, seed=0)
    few = V.verification_metrics(few_gen, few_imp)
    assert few["tar@far1e-3"] is None  # 1e-3 cannot be measured on fewer than 1,000 impostor pairs
    assert few["tar@far1e-2"] is None and len(few_imp) < 100


def test_vectorised_thresholds_and_rates_match_the_scalar_definitions():
    rng = np.random.default_rng(5)
    imp, gen = np.round(rng.normal(size=300), 2), np.round(rng.normal(1, 1, 120), 2)
    fars = [0.0, 1 / 300, 0.001, 0.01, 0.1, 0.5, 1.0]
    ts = V.thresholds_at_fars(imp, fars)
    for far, t in zip(fars, ts, strict=True):
        # Brute force over every observed score (and -inf): the lowest one keeping FAR within the target.
        ok = [c for c in [-np.inf, *np.unique(imp), np.nextafter(imp.max(), np.inf)] if (imp >= c).mean() <= far]
        assert (imp >= t).mean() == (imp >= min(ok)).mean() and (imp >= t).mean() <= far
    assert ts[-1] == -np.inf
    assert np.allclose(V.accept_rates(gen, ts), [V.accept_rate(gen, t) for t in ts])
    assert np.isnan(V.accept_rates(np.array([]), ts)).all()
    assert V.far_key(0.01) == "1e-2" and V.far_key(0.001) == "1e-3" and V.far_key(5e-4) == "5e-4"


def test_calibration_against_brute_force():
    emb, labels = clustered(25, 5, 0.5, seed=7)
    record = V.calibrate(emb, labels, far=1e-2, fars=(1e-2, 1e-1), n_impostors=2000, seed=3)
    # Brute force: every pair's cosine by loops, the same seeded impostor draw.
    imp_pairs = V.impostor_pairs(labels, 2000, np.random.default_rng(3))
    gen = [emb[i] @ emb[j] for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] == labels[j]]
    imp = np.array([emb[i] @ emb[j] for i, j in imp_pairs])
    t = record["similarity"]
    # 2000 x 1e-2 = 20 impostors may pass: the threshold sits just above the 21st highest (the loops'
    # dot products may differ from the vectorised ones in the last bit, hence the tolerance).
    ranked = np.sort(imp)[::-1]
    assert t == pytest.approx(ranked[20], abs=1e-12) and ranked[19] > t
    assert record["tar"] == pytest.approx(np.mean(np.array(gen) >= t))
    assert record["far_measured"] == (imp > ranked[20]).mean() == 1e-2  # the 20 above the 21st
    assert record["n_genuine"] == len(gen) == 25 * 10 and record["n_impostor"] == 2000
    assert record["resolved"] and record["far"] == 0.01 and record["source"] == "validation identities"
    assert record["at_far"]["0.01"] == t and set(record["at_far"]) == {"0.1", "0.01"}
    assert record["at_far"]["0.1"] == pytest.approx(ranked[200], abs=1e-12)  # 200 of 2000 may pass
    assert record == V.calibrate(emb, labels, 1e-2, (1e-2, 1e-1), 2000, 3)  # seeded
    assert json.loads(json.dumps(record)) == record  # JSON-simple: the model file and threshold.json hold it


def test_too_few_impostor_pairs_reject_every_one():
    emb, labels = clustered(4, 3, 0.5, seed=1)  # 66 pairs, 54 impostors: cannot measure a FAR of 1e-3
    record = V.calibrate(emb, labels, far=1e-3, fars=(1e-2,), n_impostors=1000, seed=0)
    _, imp = V.verification_scores(emb, labels, 1000, 0)
    assert record["n_impostor"] == len(imp) == 54 and not record["resolved"]
    assert record["far_measured"] == 0.0 and (imp < record["similarity"]).all()
    assert record["similarity"] == np.nextafter(imp.max(), np.inf)  # the least threshold rejecting them all
    assert V.calibrate(emb[labels == 0], labels[labels == 0], 1e-3, (1e-2,), 1000, 0) is None  # one person


def test_open_set_identification_brute_force():
    emb, labels = clustered(10, 4, 0.2, seed=3)
    enrolled = labels < 5
    gallery, g_labels = emb[enrolled & (np.arange(40) % 4 != 0)], labels[enrolled & (np.arange(40) % 4 != 0)]
    queries, q_labels = emb[np.arange(40) % 4 == 0], labels[np.arange(40) % 4 == 0]
    t = 0.8
    m = V.open_set_identification(queries, q_labels, gallery, g_labels, t)
    found = alarms = 0
    for q, lab in zip(queries, q_labels, strict=True):
        sims = gallery @ q
        best = int(np.argmax(sims))
        if lab < 5:
            found += g_labels[best] == lab and sims[best] >= t
        else:
            alarms += sims[best] >= t
    assert m["tpir"] == found / 5 and m["fpir"] == alarms / 5
    assert m["enrolled_queries"] == m["stranger_queries"] == 5


def test_open_set_by_hand():
    # 2-d unit vectors: gallery of enrolled people 1 and 2; queries of 1, 2 (enrolled) and 3 (a stranger).
    def unit(deg):
        return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])

    gallery, g_labels = np.eye(2), np.array([1, 2])
    tie = np.full(2, np.sqrt(0.5))  # exactly as similar to both gallery faces: the tie goes to row 0
    queries = np.stack([unit(10), unit(50), [-1.0, 0.0], tie])
    q_labels = np.array([1, 2, 3, 2])
    # cos 10 = 0.985 (right, above 0.7), cos 40 = 0.766 to person 2 (right), 0 at best (stranger, no match),
    # 0.707 to both: the tie goes to person 1, wrong for a query of person 2.
    m = V.open_set_identification(queries, q_labels, gallery, g_labels, threshold=0.7)
    assert m == {"tpir": 2 / 3, "fpir": 0.0, "enrolled_queries": 3, "stranger_queries": 1, "gallery": 2}
    m = V.open_set_identification(queries, q_labels, gallery, g_labels, threshold=0.8)
    assert m["tpir"] == 1 / 3 and m["fpir"] == 0.0  # only the 10-degree query clears 0.8
    m = V.open_set_identification(queries, q_labels, gallery, g_labels, threshold=-1.0)
    assert m["fpir"] == 1.0  # everything clears: the stranger gets a (false) match
    # Chunking the similarities changes nothing.
    assert V.open_set_identification(queries, q_labels, gallery, g_labels, 0.7, chunk=1) == V.open_set_identification(
        queries, q_labels, gallery, g_labels, 0.7
    )


def test_open_set_half_enrols_half_the_identities_seeded():
    emb, labels = clustered(10, 4, 0.2, seed=3)
    is_query = np.arange(40) % 4 == 0
    enrolled = V.enrolled_half(labels, seed=2)
    assert len(enrolled) == 5 and np.array_equal(enrolled, V.enrolled_half(labels, seed=2))
    m = V.open_set_half(emb[is_query], labels[is_query], emb[~is_query], labels[~is_query], 0.5, seed=2)
    keep = np.isin(labels[~is_query], enrolled)
    assert m == V.open_set_identification(emb[is_query], labels[is_query], emb[~is_query][keep],
                                          labels[~is_query][keep], 0.5)  # fmt: skip
    assert m["enrolled_queries"] == m["stranger_queries"] == 5 and m["gallery"] == 15
    assert len(V.enrolled_half(np.arange(7), seed=0)) == 3


def test_open_set_takes_another_searchs_top1_but_judges_its_plain_similarity():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(12, 4))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g_labels = np.arange(12) // 2
    q, q_labels = g[::2] + 0.01, g_labels[::2]
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    plain = V.open_set_identification(q, q_labels, g, g_labels, 0.9)
    same = V.open_set_identification(q, q_labels, g, g_labels, 0.9, top1=lambda a, b: np.argmax(a @ b.T, axis=1))
    assert plain == same and plain["tpir"] == 1.0
    # A search whose first result is always another person's: nobody is found, whatever it scores.
    wrong = V.open_set_identification(
        q, q_labels, g, g_labels, -1.0, top1=lambda a, b: (np.arange(len(a)) * 2 + 2) % 12
    )
    assert wrong["tpir"] == 0.0


def test_open_set_right_person_below_threshold_is_not_found_and_a_quiet_stranger_is_no_match():
    # Re-ranking may put a same-person photo first whose own cosine similarity is low: the
    # verdict is that photo's plain similarity, so the person is not found at 0.9, though the
    # plain top-1 (row 0, cos 10 degrees = 0.985) would have been a match.
    def unit(deg):
        return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])

    gallery, g_labels = np.stack([unit(0), unit(60), unit(180)]), np.array([1, 1, 2])
    queries, q_labels = np.stack([unit(10), unit(170)]), np.array([1, 3])  # person 1; a stranger near person 2

    def picks(q_emb, g_emb):  # person 1's far photo; for the stranger, person 1's near one
        return np.array([1, 0])

    m = V.open_set_identification(queries, q_labels, gallery, g_labels, 0.9, top1=picks)
    # cos 50 = 0.643 < 0.9: not found; the stranger's pick, cos 170 = -0.985: no false alarm
    assert m["tpir"] == 0.0 and m["fpir"] == 0.0
    plain = V.open_set_identification(queries, q_labels, gallery, g_labels, 0.9)
    assert plain["tpir"] == 1.0 and plain["fpir"] == 1.0  # plain top-1s: row 0 (0.985) and row 2 (cos 10 = 0.985)
