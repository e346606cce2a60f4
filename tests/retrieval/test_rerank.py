"""Gallery-side re-ranking against brute force on small seeded data: DBA, QE, k-reciprocal
sets and re-ranking, leak-freedom, the search contract, and the safety property on galleries
of one or two photos per person."""

from __future__ import annotations

import numpy as np
import pytest

from bench.rerank import few_counts, many_counts, synthetic_faces
from facesearch.retrieval.knn import build_index
from facesearch.retrieval.metrics import evaluate
from facesearch.retrieval.rerank import (
    GalleryStructure,
    RerankParams,
    build_rerank_index,
    leave_one_out_metrics,
    neighbour_graph,
    prepare,
    without,
)

DBA = {"method": "dba_qe"}
PLAIN = {"method": "dba_qe", "adaptive": False}
KR = {"method": "k_reciprocal"}
ALL = [{"method": "none"}, DBA, PLAIN, KR]


@pytest.fixture(scope="module")
def many():
    """60 people, 800 photos (long-tailed counts), 64-d."""
    rng = np.random.default_rng(0)
    return synthetic_faces(many_counts(60, 800, rng), 60, rng, dim=64)


@pytest.fixture(scope="module")
def few():
    """200 people with one or two photos each, plus distractors: ~600 photos, 64-d."""
    rng = np.random.default_rng(1)
    return synthetic_faces(few_counts(200, 600, rng), 200, rng, dim=64)


@pytest.fixture(scope="module")
def small():
    """Fast brute-force scale, 16-d: 20 people with ~8 photos, 40 with one or two; 12 queries."""
    rng = np.random.default_rng(2)
    counts = np.concatenate([many_counts(20, 160, rng), few_counts(40, 40, rng)])
    q, _, g, _ = synthetic_faces(counts, 12, rng, dim=16)
    return q, g


def dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a[:, None, :].astype(np.float64) - b[None].astype(np.float64), axis=-1)


def others_sorted(d_gg: np.ndarray, i: int) -> np.ndarray:
    """Gallery items other than i, nearest first (ties by index)."""
    row = d_gg[i].copy()
    row[i] = np.inf
    return np.argsort(row, kind="stable")[:-1]


def expand(x, vectors, nbrs, w):
    if not (w > 0).any():
        return x.astype(np.float64)
    mixed = x + (w[:, None] * vectors[nbrs]).sum(0)
    return mixed / np.linalg.norm(mixed)


def weights(d, d_bg, alpha, adaptive):
    s = 1 - d**2 / 2
    if not adaptive:
        return np.maximum(s, 0) ** alpha
    s_b = 1 - d_bg**2 / 2
    return (np.maximum(s - s_b, 0) / (1 - s_b)) ** alpha


def mean_ap(data, index) -> float:
    q, q_lab, g, g_lab = data
    return evaluate(q, q_lab, g, g_lab, index, ks=(10, 100))[0]["mAP"]


@pytest.mark.parametrize("params", [DBA, PLAIN, {**DBA, "n": 5, "alpha": 2.0, "background": 8}])
def test_dba_vectors_equal_direct_weighted_mean(small, params):
    _, g = small
    p = RerankParams.from_dict(params)
    d_gg = dists(g, g)
    expected = np.empty(g.shape)
    for i in range(len(g)):
        order = others_sorted(d_gg, i)
        nbrs = order[: p.n]
        w = weights(d_gg[i, nbrs], d_gg[i, order[p.background - 1]], p.alpha, p.adaptive)
        expected[i] = expand(g[i], g, nbrs, w)
    got = prepare(g, params).expanded
    assert np.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("params", [DBA, PLAIN])
def test_qe_equals_averaging_then_exact_search(small, params):
    q, g = small
    p = RerankParams.from_dict(params)
    structure = prepare(g, params)
    e = structure.expanded.astype(np.float64)
    d_gg = dists(g, g)
    radius = np.array([d_gg[j, others_sorted(d_gg, j)[p.n - 1]] for j in range(len(g))])
    d_qe, d_qg = dists(q, e), dists(q, g)
    k = 15
    expected = np.empty((len(q), k), np.int64)
    expected_d = np.empty((len(q), k))
    moved = 0
    for r in range(len(q)):
        order = np.argsort(d_qe[r], kind="stable")
        nbrs = order[: p.n]
        w = weights(d_qe[r, nbrs], d_qe[r, order[p.background - 1]], p.alpha, p.adaptive)
        if p.adaptive:  # mutual: the raw query would be in each result's raw top n
            w = np.where(d_qg[r, nbrs] <= radius[nbrs], w, 0.0)
        moved += (w > 0).any()
        q2 = expand(q[r], e, nbrs, w)
        d2 = dists(q2[None], e)[0]
        expected[r] = np.argsort(d2, kind="stable")[:k]
        expected_d[r] = d2[expected[r]]
    dist, idx = build_rerank_index(structure).search(q, k)
    # Some queries expand; with the mutual test some must not, or it would go untested.
    assert 0 < moved < len(q) if p.adaptive else moved == len(q)
    assert np.array_equal(idx, expected)
    assert np.allclose(dist, expected_d, atol=1e-4)


def brute_sets(d_gg: np.ndarray, k: int) -> list[set[int]]:
    """R(g, k) = {h in N(g, k) : g in N(h, k)}, N(g, k) = g and its k nearest others."""
    near = [{i, *others_sorted(d_gg, i)[:k].tolist()} for i in range(len(d_gg))]
    return [{h for h in near[i] if i in near[h]} for i in range(len(d_gg))]


def brute_expand(r: set[int], half: list[set[int]]) -> set[int]:
    out = set(r)
    for c in r:
        if len(half[c] & r) > 2 / 3 * len(half[c]):
            out |= half[c]
    return out


def test_k_reciprocal_sets_equal_brute_force(small):
    q, g = small
    p = RerankParams.from_dict({**KR, "k1": 8})
    structure = prepare(g, p)
    d_gg = dists(g, g)
    full, half = brute_sets(d_gg, p.k1), brute_sets(d_gg, p.k1 // 2)
    assert [set(structure.half[i].indices.tolist()) for i in range(len(g))] == half
    star = [brute_expand(full[i], half) for i in range(len(g))]
    assert [set(structure.v[i].indices.tolist()) for i in range(len(g))] == star
    assert any(star[i] != full[i] for i in range(len(g)))  # the expansion happens here

    # A query's set, by definition: g in its top k1, and the query would be in g's top k1 were
    # it added to the gallery (fewer than k1 others strictly nearer to g than the query is).
    index = build_rerank_index(structure).index
    dist, idx = index.base.search(q, 30)
    r_q, star_q = index.query_sets(dist, idx)
    d_qg = dists(q, g)
    for row in range(len(q)):
        top = np.argsort(d_qg[row], kind="stable")[: p.k1]
        own = {int(h) for h in top if (np.delete(d_gg[h], h) < d_qg[row, h]).sum() < p.k1}
        assert set(r_q[row].indices.tolist()) == own
        assert set(star_q[row].indices.tolist()) == brute_expand(own, half)


def test_k_reciprocal_ranking_equals_dense_brute_force(small):
    q, g = small
    p = RerankParams.from_dict({**KR, "k1": 8, "k2": 3, "candidates": 40})
    d_gg, d_qg = dists(g, g), dists(q, g)
    half = brute_sets(d_gg, p.k1 // 2)
    star = [brute_expand(s, half) for s in brute_sets(d_gg, p.k1)]

    def v_row(members, d_row):
        v = np.zeros(len(g))
        cols = sorted(members)
        v[cols] = np.exp(-(d_row[cols] ** 2))
        return v / v.sum() if v.sum() else v

    v = np.array([v_row(star[i], d_gg[i]) for i in range(len(g))])
    v_qe = np.array([v[[i, *others_sorted(d_gg, i)[: p.k2 - 1]]].mean(0) for i in range(len(g))])
    dist, idx = build_rerank_index(prepare(g, p)).search(q, 60)
    for row in range(len(q)):
        order = np.argsort(d_qg[row], kind="stable")
        own = {int(h) for h in order[: p.k1] if (np.delete(d_gg[h], h) < d_qg[row, h]).sum() < p.k1}
        vq = (v_row(brute_expand(own, half), d_qg[row]) + v[order[: p.k2 - 1]].sum(0)) / p.k2
        cand = order[: p.candidates]
        jac = 1 - np.minimum(vq, v_qe[cand]).sum(1) / np.maximum(vq, v_qe[cand]).sum(1)
        blended = (1 - p.lam) * jac + p.lam * d_qg[row, cand] ** 2 / 2
        assert np.array_equal(idx[row, : p.candidates], cand[np.argsort(blended, kind="stable")])
        assert np.allclose(dist[row, : p.candidates], np.sort(blended), atol=1e-5)
        assert np.array_equal(idx[row, p.candidates :], order[p.candidates : 60])  # base order beyond
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize("params", [DBA, PLAIN, KR])
def test_queries_never_change_the_structure_or_each_other(small, params):
    q, g = small
    structure = prepare(g, params)
    snapshot = {name: getattr(structure, name).copy() for name in ("gallery", "expanded", "qe_radius", "radius")
                if getattr(structure, name) is not None}  # fmt: skip
    index = build_rerank_index(structure)
    dist, idx = index.search(q, 20)
    perm = np.random.default_rng(0).permutation(len(q))
    d_perm, i_perm = index.search(q[perm], 20)
    assert np.array_equal(i_perm, idx[perm]) and np.allclose(d_perm, dist[perm], atol=1e-6)
    for r in range(len(q)):  # alone, and in a batch with one other query
        d1, i1 = index.search(q[r : r + 1], 20)
        d2, i2 = index.search(q[[r, (r + 1) % len(q)]], 20)
        assert np.array_equal(i1[0], idx[r]) and np.array_equal(i2[0], idx[r])
        assert np.allclose(d1[0], dist[r], atol=1e-6) and np.allclose(d2[0], dist[r], atol=1e-6)
    for name, before in snapshot.items():
        assert np.array_equal(getattr(structure, name), before)
    # The structure is the same however it is prepared again: it depends on the gallery alone.
    again = prepare(g, params)
    assert all(np.array_equal(getattr(again, name), before) for name, before in snapshot.items())


@pytest.mark.parametrize("params", ALL)
def test_structure_saves_and_loads(small, params, tmp_path):
    q, g = small
    structure = prepare(g, params)
    structure.save(tmp_path / "structure")
    loaded = GalleryStructure.load(tmp_path / "structure")
    assert loaded.params == structure.params
    d0, i0 = build_rerank_index(structure).search(q, 30)
    d1, i1 = build_rerank_index(loaded).search(q, 30)
    assert np.array_equal(i0, i1) and np.array_equal(d0, d1)


@pytest.mark.parametrize("params", ALL)
@pytest.mark.parametrize("n_gallery", [1, 2, 7, 200])
@pytest.mark.parametrize("k", [1, 5, 300])
def test_exactly_min_k_n_real_neighbours_nearest_first(small, params, n_gallery, k):
    q, g = small
    dist, idx = build_rerank_index(prepare(g[:n_gallery], params)).search(q, k)
    assert idx.shape == dist.shape == (len(q), min(k, n_gallery))
    assert idx.min() >= 0 and idx.max() < n_gallery
    assert all(len(np.unique(row)) == idx.shape[1] for row in idx)
    assert np.all(np.diff(dist, axis=1) >= -1e-6)


def test_none_is_the_plain_search(small):
    q, g = small
    d0, i0 = build_index(g).search(q, 25)
    d1, i1 = build_rerank_index(prepare(g, {"method": "none"})).search(q, 25)
    assert np.array_equal(i0, i1) and np.array_equal(d0, d1)


@pytest.mark.parametrize("params", [DBA, KR])
def test_reranking_raises_map_with_many_photos_per_person(many, params):
    g = many[2]
    base = mean_ap(many, build_index(g))
    assert mean_ap(many, build_rerank_index(prepare(g, params))) > base + 0.05


def test_adaptive_default_is_safe_with_one_or_two_photos_per_person(few):
    """Plain fixed-n DBA + QE lowers mAP where most people have one or two photos; the default does not."""
    g = few[2]
    base = mean_ap(few, build_index(g))
    assert mean_ap(few, build_rerank_index(prepare(g, PLAIN))) < base - 0.03
    assert mean_ap(few, build_rerank_index(prepare(g, DBA))) > base - 0.01


@pytest.mark.parametrize("params", [DBA, KR])
def test_unnormalised_embeddings_are_refused_with_a_fix(small, params):
    # A normalize: false backbone's raw vectors would be weighed as if unit: refused, not mis-ranked.
    _, g = small
    with pytest.raises(ValueError, match=r"L2-normalised.*method none"):
        prepare(g * 3.0, params)
    assert len(prepare(g * 3.0, {"method": "none"}).gallery) == len(g)  # the plain search takes any vectors


def test_params():
    p = RerankParams.from_dict({"method": "k_reciprocal", "lambda": 0.5})
    assert p.lam == 0.5 and RerankParams.from_dict(None).method == "none"
    with pytest.raises(ValueError, match="unknown rerank params"):
        RerankParams.from_dict({"k3": 1})
    with pytest.raises(ValueError, match="method"):
        RerankParams(method="dba")


def test_graph_without_an_item_is_the_smaller_gallerys_graph(small):
    _, g = small
    graph = neighbour_graph(g, 9)
    for drop in (0, 7, len(g) - 1):
        others = np.delete(g, drop, axis=0)
        d, i = without(graph, drop)
        fresh_d, fresh_i = neighbour_graph(others, 8)
        assert np.array_equal(i, fresh_i) and np.allclose(d, fresh_d, atol=1e-6)


@pytest.mark.parametrize("params", ALL)
def test_leave_one_out_equals_one_fresh_structure_per_query(small, params):
    """Brute force: each image against a structure built from scratch on all the others."""
    from facesearch.retrieval.metrics import identity_metrics

    _, g = small
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 15, len(g))  # some identities with one image: they do not query
    p = RerankParams.from_dict({**params, "k1": 6, "k2": 3, "background": 5, "candidates": 40})
    per_query = []
    for i in range(len(g)):
        if (labels == labels[i]).sum() < 2:
            continue
        others = np.flatnonzero(np.arange(len(g)) != i)
        _, order = build_rerank_index(prepare(g[others], p)).search(g[i : i + 1], len(others))
        per_query.append(identity_metrics(order, labels[i : i + 1], labels[others]))
    got = leave_one_out_metrics(g, labels, p)
    for key in ("rank1", "rank5", "mAP"):
        assert got[key] == pytest.approx(np.mean([m[key] for m in per_query]), abs=1e-9), key


def test_leave_one_out_stops_at_its_photo_limit(small):
    _, g = small
    labels = np.arange(len(g)) // 4
    assert leave_one_out_metrics(g, labels, {"method": "dba_qe", "loo_max_photos": len(g) - 1}) is None
    assert leave_one_out_metrics(g, labels, {"method": "none", "loo_max_photos": 1}) is not None  # plain: no limit


def test_loo_metrics_over_query_and_gallery_reranked_up_to_the_limit(small):
    from facesearch.retrieval.metrics import loo_metrics as plain
    from facesearch.retrieval.rerank import loo_metrics

    q, g = small
    ql, gl = np.arange(len(q)) % 5, np.arange(len(g)) % 5
    both, labels = np.concatenate([q, g]), np.concatenate([ql, gl])
    p = RerankParams.from_dict(DBA)
    got = loo_metrics(q, ql, g, gl, p)
    want = leave_one_out_metrics(both, labels, p)
    assert got["loo_reranked"] and got["loo_queries"] == len(both)
    assert got["loo_mAP"] == pytest.approx(want["mAP"]) and got["loo_rank1"] == pytest.approx(want["rank1"])
    # method none and a gallery past the photo limit both fall back to the plain leave-one-out
    for params in ({"method": "none"}, {**DBA, "loo_max_photos": len(both) - 1}):
        fallback = loo_metrics(q, ql, g, gl, RerankParams.from_dict(params))
        assert fallback == {**plain(q, ql, g, gl), "loo_reranked": False}
