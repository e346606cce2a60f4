from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest

from facesearch.retrieval import metrics as retrieval
from facesearch.retrieval.knn import build_index
from facesearch.retrieval.metrics import (
    attribute_agreement,
    evaluate,
    exact_ranking,
    identity_metrics,
    leave_one_out_metrics,
)


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


@pytest.fixture(scope="module")
def random_set():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(30, 16))
    g_labels = np.repeat(np.arange(30), 8)
    gallery = centers[g_labels] + rng.normal(scale=1.0, size=(240, 16))
    q_labels = np.arange(30)
    query = centers + rng.normal(scale=1.0, size=(30, 16))
    return query.astype(np.float32), q_labels, gallery.astype(np.float32), g_labels


@pytest.mark.parametrize("backend", ["exact", "ckdtree"])
def test_backends_match_brute_force(random_set, backend):
    query, _, gallery, _ = random_set
    d, i = build_index(gallery, backend).search(query, 7)
    brute = np.sqrt(((query[:, None] - gallery[None]) ** 2).sum(-1))
    expected = np.argsort(brute, axis=1, kind="stable")[:, :7]
    assert np.array_equal(i, expected)
    assert np.allclose(d, np.take_along_axis(brute, expected, 1), atol=1e-4)


def test_evaluate_matches_full_ranking(random_set):
    query, q_labels, gallery, g_labels = random_set
    # K = 10 while each identity has 8 of the 240 gallery images: many relevant images rank
    # outside the top K, so their exact ranks must be counted for mAP.
    metrics, cmc, _ = evaluate(query, q_labels, gallery, g_labels, build_index(gallery), ks=(5, 10))
    full = identity_metrics(exact_ranking(query, gallery), q_labels, g_labels)
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert metrics[key] == pytest.approx(full[key]), key
    assert cmc[0] == metrics["rank1"] and cmc[9] == metrics["rank10"] and len(cmc) == 10
    ranking = exact_ranking(query, gallery)
    expected_recall = np.mean([(g_labels[ranking[i, :5]] == q_labels[i]).sum() / 8 for i in range(len(query))])
    assert metrics["recall@5"] == pytest.approx(expected_recall)
    kd, _, _ = evaluate(query, q_labels, gallery, g_labels, build_index(gallery, "ckdtree"), ks=(5, 10))
    assert kd == pytest.approx(metrics)


def test_attribute_agreement_by_hand():
    q = np.array([[1, 0, 1, 1], [np.nan] * 4])
    g = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [np.nan] * 4])
    top = np.array([[0, 1, 2], [0, 1, 2]])
    m = attribute_agreement(top, q, g, ks=(1, 3))
    assert m["attr_queries"] == 1
    assert m["attr_match@1"] == 1.0 and m["attr_results@1"] == 1
    assert m["attr_match@3"] == pytest.approx((1.0 + 0.25) / 2) and m["attr_results@3"] == 2  # no-attr result skipped
    assert m["attr_distance@3"] == pytest.approx((0 + 3) / 2)


def test_attribute_agreement_matches_brute_force():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 2, (30, 40)).astype(float)
    g = rng.integers(0, 2, (200, 40)).astype(float)
    q[[2, 7]], g[rng.choice(200, 25, replace=False)] = np.nan, np.nan  # images without attribute lines
    top = np.stack([rng.permutation(200)[:60] for _ in range(30)])
    m = attribute_agreement(top, q, g, ks=(1, 10, 60), chunk=7)  # chunks that do not divide the queries
    for k in (1, 10, 60):
        pairs = [(qi, gi) for qi in range(30) if not np.isnan(q[qi]).any()
                 for gi in top[qi, :k] if not np.isnan(g[gi]).any()]  # fmt: skip
        shares = [np.mean(q[qi] == g[gi]) for qi, gi in pairs]
        assert m[f"attr_results@{k}"] == len(pairs)
        assert m[f"attr_match@{k}"] == pytest.approx(np.mean(shares), abs=1e-12)
        assert m[f"attr_distance@{k}"] == pytest.approx(40 * (1 - np.mean(shares)), abs=1e-9)
    assert m["attr_queries"] == 28


def test_ties_rank_the_same_whatever_k():
    # A collapsed model: every embedding identical, every distance tied.
    emb = np.ones((12, 4), np.float32)
    g_labels = np.repeat(np.arange(4), 3)
    query, q_labels = emb[:4], np.arange(4)
    small, _, _ = evaluate(query, q_labels, emb, g_labels, build_index(emb), ks=(2,))
    large, _, _ = evaluate(query, q_labels, emb, g_labels, build_index(emb), ks=(12,))
    assert small["mAP"] == pytest.approx(large["mAP"])
    full = identity_metrics(exact_ranking(query, emb), q_labels, g_labels)
    assert small["mAP"] == pytest.approx(full["mAP"])


def full_ranking_loo(emb: np.ndarray, labels: np.ndarray, chunk: int) -> dict[str, float]:
    """Brute force: every query's whole row ranked by a stable sort (ties by index), itself removed.

    The same row blocks as :func:`leave_one_out_metrics` give the same float32 distances, so the
    two must agree exactly (``==``), not approximately.
    """
    q = np.array([i for i, lab in enumerate(labels) if (labels == lab).sum() > 1])
    ranking = exact_ranking(emb[q], emb, chunk=chunk)
    return identity_metrics(np.array([r[r != i] for r, i in zip(ranking, q, strict=True)]), labels[q], labels)


def test_leave_one_out_in_chunks_matches_the_full_ranking():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    emb[7] = emb[8]  # an exact tie between two images
    labels = rng.integers(0, 12, size=60)
    labels[0] = 99  # an identity with one image: never a query
    assert leave_one_out_metrics(emb, labels, chunk=5) == full_ranking_loo(emb, labels, 5)


@pytest.mark.parametrize("few", [0, 10**9])  # both ways of counting ties: one sort, one pass per value
def test_leave_one_out_with_many_ties_matches_the_full_ranking(few, monkeypatch):
    # Coarsely quantised embeddings: many images at exactly equal distances, tie-broken by index.
    monkeypatch.setattr(retrieval, "FEW_TIED_VALUES", few)
    rng = np.random.default_rng(5)
    emb = np.round(rng.normal(size=(90, 3)), 0).astype(np.float32)
    labels = rng.integers(0, 7, size=90)
    assert leave_one_out_metrics(emb, labels, chunk=16) == full_ranking_loo(emb, labels, 16)


def unit_clusters(seed: int, n: int = 400, n_ids: int = 20, dim: int = 16, scatter: float = 0.25):
    """Face-like: L2-normalised float32 photos around identity centres on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = rng.integers(0, n_ids, size=n)
    emb = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True)
    emb = emb + rng.normal(scale=scatter, size=(n, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("chunk", [1, 37, 1024])
@pytest.mark.parametrize("scatter", [0.1, 0.4, 2.0])  # from tight clusters to near-random
def test_leave_one_out_on_unit_clusters_matches_the_full_ranking(chunk, scatter):
    emb, labels = unit_clusters(seed=int(scatter * 10), scatter=scatter)
    assert leave_one_out_metrics(emb, labels, chunk=chunk) == full_ranking_loo(emb, labels, chunk)


@pytest.mark.parametrize("few", [0, 10**9])
def test_leave_one_out_with_duplicates_matches_the_full_ranking(few, monkeypatch):
    monkeypatch.setattr(retrieval, "FEW_TIED_VALUES", few)
    # The same photo several times, in its own identity and in others: equal distances, ranked by
    # index, some of them between a query and its own relevant images.
    emb, labels = unit_clusters(seed=7)
    emb[10:14] = emb[3]
    emb[50] = emb[51]
    labels[[3, 10, 11]] = labels[50]
    m = leave_one_out_metrics(emb, labels, chunk=64)
    assert m == full_ranking_loo(emb, labels, 64)


@pytest.mark.parametrize("few", [0, 10**9])
def test_leave_one_out_of_a_collapsed_model_matches_the_full_ranking(few, monkeypatch):
    monkeypatch.setattr(retrieval, "FEW_TIED_VALUES", few)
    # Every embedding equal: every distance ties, so ranks follow the index alone.
    emb = np.full((50, 4), 0.5, np.float32)
    labels = np.repeat(np.arange(10), 5)
    m = leave_one_out_metrics(emb, labels, chunk=16)
    assert m == full_ranking_loo(emb, labels, 16)
    # By hand: each query's others rank by index, so images 0-4 (id 0) come first in every row.
    # Id 0's queries hit at rank 1, id 1's (5-9) at rank 6, every other identity's after rank 10.
    assert (m["rank1"], m["rank5"], m["rank10"]) == (0.1, 0.1, 0.2)


class PaddedIndex:
    """Exact search whose last result is -1, as FAISS pads a row it cannot fill."""

    def __init__(self, gallery):
        self.exact = build_index(gallery)

    def search(self, queries, k):
        dist, idx = self.exact.search(queries, k)
        idx[:, -1] = -1
        return dist, idx


def test_evaluate_refuses_padded_results(random_set):
    # Read as an index, -1 is the last gallery image: without the guard this would score silently.
    query, q_labels, gallery, g_labels = random_set
    with pytest.raises(ValueError, match="real neighbours"):
        evaluate(query, q_labels, gallery, g_labels, PaddedIndex(gallery), ks=(5, 10))


@pytest.mark.skipif(find_spec("faiss") is None, reason="faiss not installed (pip install -r requirements-search.txt)")
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_evaluate_with_faiss(random_set, kind):
    # K = 200 of 240 images: far more than IVF's default 16 of its 61 lists hold, so IVF must
    # probe more lists, and every backend must still hand the metrics 200 real neighbours.
    query, q_labels, gallery, g_labels = random_set
    exact, _, _ = evaluate(query, q_labels, gallery, g_labels, build_index(gallery), ks=(10, 200))
    got, _, top = evaluate(query, q_labels, gallery, g_labels, build_index(gallery, "faiss", kind), ks=(10, 200))
    assert top.shape == (len(query), 200) and top.min() >= 0
    if kind == "flat":
        assert got == pytest.approx(exact)
    else:
        assert got["recall@200"] == pytest.approx(exact["recall@200"], abs=0.05)
