"""Verification metrics against brute-force definitions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from facesearch.retrieval import verification as V


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


def brute_searches(emb, labels, enrolled, strangers):
    """Every probe by hand: the gallery is every photo of the enrolled people but the probe itself."""
    mated, correct, nonmated = [], [], []
    gallery = [i for i in range(len(labels)) if labels[i] in enrolled]
    for p in range(len(labels)):
        if labels[p] not in enrolled and labels[p] not in strangers:
            continue
        others = [g for g in gallery if g != p]
        if labels[p] in enrolled and not any(labels[g] == labels[p] for g in others):
            continue
        sims = [float(emb[p] @ emb[g]) for g in others]
        best = others[int(np.argmax(sims))]  # the first of equals: the lowest gallery index
        if labels[p] in enrolled:
            mated.append(max(sims))
            correct.append(labels[best] == labels[p])
        else:
            nonmated.append(max(sims))
    return np.array(mated), np.array(correct), np.array(nonmated), len(gallery)


def test_open_set_searches_and_metrics_brute_force():
    emb, labels = clustered(12, 4, 0.6, seed=3)
    galleries, strangers = V.open_set_galleries(labels, (2, 3, 6, 50), seed=1)
    assert [name for name, _ in galleries] == ["2", "3", "all"]  # 6 and 50 are not smaller than the half
    half = galleries[-1][1]
    assert len(half) == 6 and not set(half) & set(strangers) and set(half) | set(strangers) == set(range(12))
    for name, enrolled in galleries:
        assert set(enrolled) <= set(half) and (name == "all" or len(enrolled) == int(name))
        s = V.open_set_searches(emb, labels, enrolled, strangers, chunk=7)
        mated, correct, nonmated, faces = brute_searches(emb, labels, set(enrolled), set(strangers))
        assert np.allclose(s.mated, mated) and np.array_equal(s.correct, correct)
        assert np.allclose(s.nonmated, nonmated) and s.faces == faces
        t = 0.3
        m = V.identification_metrics(s, t, fpirs=(0.1, 0.5, 0.01))
        assert m["fnir"] == pytest.approx(1 - np.mean(correct & (mated >= t)))
        assert m["fpir"] == pytest.approx(np.mean(nonmated >= t))
        assert m["tpir@fpir1e-2"] is None  # 24 stranger searches cannot resolve 1 in 100
        for fpir in (0.1, 0.5):
            # The lowest threshold letting at most that share of strangers through, by hand.
            allowed = int(np.floor(fpir * len(nonmated) + 1e-9))
            cut = np.nextafter(np.sort(nonmated)[::-1][allowed], np.inf)
            assert np.mean(nonmated >= cut) <= fpir
            assert m[f"tpir@fpir{V.far_key(fpir)}"] == pytest.approx(np.mean(correct & (mated >= cut)))
    det = V.det_curve(s, points=30)
    assert det["fpir"][-1] == 1.0 and (np.diff(det["fpir"]) > 0).all() and (np.diff(det["fnir"]) <= 1e-12).all()
    assert det["fnir"][-1] == pytest.approx(1 - np.mean(correct))  # at FPIR 1 only a wrong top-1 is missed


def test_open_set_by_hand():
    # 2-d unit vectors: persons 1 and 2 enrolled (two photos each), 3 a stranger.
    def unit(deg):
        return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])

    emb = np.stack([unit(0), unit(10), unit(90), unit(130), unit(180)])
    labels = np.array([1, 1, 2, 2, 3])
    s = V.open_set_searches(emb, labels, [1, 2], [3])
    # Person 1's photos find each other at cos 10 = 0.985; person 2's at cos 40 = 0.766; the stranger's best
    # is person 2's 130-degree photo at cos 50 = 0.643.
    assert np.allclose(s.mated, [np.cos(np.radians(10))] * 2 + [np.cos(np.radians(40))] * 2)
    assert s.correct.all() and np.allclose(s.nonmated, [np.cos(np.radians(50))]) and s.faces == 4
    m = V.identification_metrics(s, 0.8)
    assert (m["fnir"], m["fpir"]) == (0.5, 0.0)  # person 2 is missed at 0.8, the stranger is no match
    assert V.identification_metrics(s, 0.6)["fpir"] == 1.0
    # A tie at the top goes to the lowest gallery index, as every search backend here.
    tie = V.open_set_searches(np.stack([unit(0), unit(90), unit(45)]), np.array([1, 2, 2]), [1, 2], [])
    # Person 1's only photo searches nobody of theirs (no mated search); photo 3 (person 2) ties photos 1 and 2 at
    # cos 45: photo 1, person 1's, wins.
    assert tie.correct.tolist() == [True, False]
    # An enrolled person's only photo: without it they are not in the gallery, so it is no mated search.
    lone = V.open_set_searches(np.stack([unit(0), unit(90), unit(100)]), np.array([1, 2, 2]), [1, 2], [])
    assert len(lone.mated) == 2 and lone.correct.all()


def test_enrolled_half_is_seeded():
    _, labels = clustered(10, 4, 0.2, seed=3)
    enrolled = V.enrolled_half(labels, seed=2)
    assert len(enrolled) == 5 and np.array_equal(enrolled, V.enrolled_half(labels, seed=2))
    assert len(V.enrolled_half(np.arange(7), seed=0)) == 3


def faces_like(n_people: int, per_person: int, rng: np.random.Generator, d: int = 64, noise: float = 1.0):
    """Unit embeddings of ``n_people`` people, ``per_person`` photos each (a centre plus noise), float32."""
    centres = rng.normal(size=(n_people, d)).astype(np.float32)
    emb = np.repeat(centres, per_person, 0) + noise * rng.normal(size=(n_people * per_person, d)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), np.repeat(np.arange(n_people), per_person)


def test_identification_threshold_rises_with_the_gallery_and_is_exact_where_pairs_resolve_it():
    rng = np.random.default_rng(0)
    emb, labels = faces_like(60, 5, rng)
    record = V.identification_record(emb, labels, fpir=0.01, seed=0)
    sizes = [1, 10, 100, 10_000, 1_000_000]
    thresholds = [V.identification_threshold(record, n) for n in sizes]
    assert all(a < b for a, b in itertools.pairwise(thresholds)) and thresholds[-1] < 1
    for n, t in zip(sizes, thresholds, strict=True):
        assert V.fpir_at(record, t, n)[0] == pytest.approx(0.01, rel=1e-3)  # the promise, as modelled
    # One face: the search is one pair, so the threshold is the pairs' own quantile at FAR 1%.
    scores = V.stranger_scores(emb, labels, seed=0)
    assert np.mean(scores >= thresholds[0]) == pytest.approx(0.01, abs=0.002)
    # More comparisons than the caps: a seeded subsample, the same each time.
    again = V.identification_record(emb, labels, fpir=0.01, seed=0, max_queries=50, max_cohort=100)
    assert again == V.identification_record(emb, labels, fpir=0.01, seed=0, max_queries=50, max_cohort=100)
    assert again["tail"]["comparisons"] < record["tail"]["comparisons"]
    json.dumps(record)  # it lives in the model file


@pytest.mark.slow
def test_no_match_holds_for_a_gallery_of_a_million_faces():
    """Calibrated on 300 people, the verdict's FPIR holds for strangers searching 1,000 or 1,000,000 faces.

    Searched for real: 400 strangers against galleries of new people (five photos each), made a
    chunk at a time. The model extrapolates far beyond the calibration pairs (1e-8 per pair at a
    million faces); the check allows twice the binomial noise of 400 searches.
    """
    rng = np.random.default_rng(1)
    emb, labels = faces_like(300, 5, rng)
    record = V.identification_record(emb, labels, fpir=0.01, seed=0)
    strangers, _ = faces_like(400, 1, rng)
    best, done = np.full(len(strangers), -2.0, np.float32), 0
    for n in (1_000, 1_000_000):
        while done < n:
            chunk, _ = faces_like(min(200_000, n - done) // 5, 5, rng)
            best = np.maximum(best, (strangers @ chunk.T).max(1))
            done += len(chunk)
        fpir = float(np.mean(best >= V.identification_threshold(record, n)))
        assert fpir <= 0.01 + 2 * np.sqrt(0.01 * 0.99 / len(strangers)), (n, fpir)
    # The 1:1 threshold at the same rate per pair lets most strangers through a million faces.
    one_to_one = V.thresholds_at_fars(V.stranger_scores(emb, labels, seed=0), [0.01])[0]
    assert np.mean(best >= one_to_one) > 0.9


def test_a_collapsed_model_still_gets_a_threshold():
    emb = np.tile([[1.0, 0.0, 0.0]], (40, 1))  # every face the same embedding: similarity 1 everywhere
    labels = np.repeat(np.arange(8), 5)
    record = V.identification_record(emb, labels, fpir=0.01, seed=0)
    t = V.identification_threshold(record, 100)
    assert 1.0 < t <= 1.0 + 1e-3  # nothing can clear it: every answer is "no match", never a false one


def test_verdict_threshold_kinds():
    emb, labels = clustered(10, 4, 0.3)
    record = V.calibrate(emb, labels, 1e-2, (1e-2,), 1000, 0, fpir=0.05, data={"description": "x", "synthetic": True})
    t, kind = V.verdict_threshold(record, 50)
    assert kind == "identification" and t == V.identification_threshold(record["identification"], 50)
    assert record["data"] == {"description": "x", "synthetic": True}
    assert V.verdict_threshold({"similarity": 0.7}, 50) == (0.7, "1:1") and V.verdict_threshold(None, 5) is None
    # Embeddings longer than 1 (a normalize: false model) are calibrated as cosines.
    scaled = V.calibrate(emb * 7.0, labels, 1e-2, (1e-2,), 1000, 0, fpir=0.05)
    assert scaled["similarity"] == pytest.approx(record["similarity"]) and -1 <= scaled["similarity"] <= 1
