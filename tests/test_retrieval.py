from __future__ import annotations

import numpy as np
import pytest

from facesearch.retrieval import exact_ranking, identity_metrics, leave_one_out_metrics


def test_exact_ranking_matches_brute_force():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 4)), rng.normal(size=(50, 4))
    brute = np.argsort(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1), axis=1, kind="stable")
    assert np.array_equal(exact_ranking(q, g, chunk=3), brute)


def test_identity_metrics_by_hand():
    # Query 0 (id 1): gallery ranked [id2, id1, id1] -> first hit at rank 2; AP = (1/2 + 2/3) / 2.
    # Query 1 (id 2): gallery ranked [id2, id1, id1] -> first hit at rank 1; AP = 1.
    gallery_labels = np.array([2, 1, 1])
    ranking = np.array([[0, 1, 2], [0, 1, 2]])
    m = identity_metrics(ranking, np.array([1, 2]), gallery_labels, ks=(1, 2))
    assert m["rank1"] == 0.5 and m["rank2"] == 1.0
    assert m["mAP"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)


def test_query_without_match_is_an_error():
    with pytest.raises(ValueError, match="at least one gallery image"):
        identity_metrics(np.array([[0]]), np.array([5]), np.array([1]))


def test_leave_one_out_perfect_clusters():
    emb = np.array([[0, 0], [0, 0.1], [5, 5], [5, 5.1], [9, 0]], dtype=np.float32)
    labels = np.array([1, 1, 2, 2, 3])  # identity 3 has one image: never a query
    m = leave_one_out_metrics(emb, labels)
    assert m["rank1"] == 1.0 and m["mAP"] == 1.0
