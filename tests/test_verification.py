"""Verification metrics against brute-force definitions."""

from __future__ import annotations

import itertools

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
    m, roc = V.verification_metrics(emb, labels, n_impostors=5000, seed=0)
    assert m["genuine_pairs"] == 30 * 15 and m["impostor_pairs"] == 5000
    assert 0.95 < m["roc_auc"] <= 1.0
    assert 0 < m["tar@far1e-3"] <= m["tar@far1e-2"] <= 1
    assert m["threshold@far1e-3"] >= m["threshold@far1e-2"]
    assert (np.diff(roc["far"]) >= 0).all() and (np.diff(roc["tar"]) >= 0).all()
    few, _ = V.verification_metrics(emb[:12], labels[:12], n_impostors=500, seed=0)
    assert few["tar@far1e-3"] is None  # 1e-3 cannot be measured on fewer than 1,000 impostor pairs


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
