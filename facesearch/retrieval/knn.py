"""Nearest-neighbour search backends, shared by the evaluation stage and the app.

Every backend answers ``search(queries, k) -> (distances, indices)``: Euclidean
distances, nearest first, shapes (Q, min(k, N)) for a gallery of N, and every
index a real gallery image. :func:`build_index` wraps each backend in that
check, so a short answer raises instead of reaching the metrics (FAISS pads a
row it cannot fill with index -1, which numpy reads as the last gallery image).
Backends:

- ``exact``: batched brute force, a matrix product per chunk of queries plus a
  partial sort (``argpartition``) of each row. Exact, and at 128-d the fastest
  on a CPU for galleries up to a few hundred thousand.
- ``ckdtree``: scipy's KD-tree, as the original design had it. Exact too, but
  a KD-tree prunes little in 128 dimensions, so it is slower than ``exact``.

  Both answer what a stable sort of each row by distance would: equal distances in
  gallery index order, the k-th distance's ties included (the rule the evaluation's
  rank counting and the re-ranking's neighbour graphs rely on).
- ``faiss``: optional (``requirements-search.txt``, ``faiss-cpu``);
  ``faiss_index``:

  - ``flat``: exact, FAISS's brute force.
  - ``hnsw``: graph search, ``hnsw_m`` links per node; each search explores
    ``max(ef_search, k)`` candidates, since fewer than k cannot yield k results.
  - ``ivf``: ``ivf_lists`` k-means lists (default 4·√N, at most N), ``nprobe``
    of them scanned per query. Where the nearest ``nprobe`` lists hold fewer
    than k vectors (at CelebA size ~48 per list: 16 lists hold ~770 < 1000),
    that query scans more: enough of its nearest lists to hold k (counted from
    the list sizes), rounded up to ``nprobe`` times a power of two, at most
    every list, which is exhaustive.

  ``hnsw`` and ``ivf`` are approximate, for galleries of millions;
  ``bench/search.py`` reports their recall against exact search.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from facesearch.nets.distances import squared_distances

BACKENDS = ("exact", "ckdtree", "faiss")


class SearchIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def lowest_k(d: np.ndarray, k: int) -> np.ndarray:
    """Column indices (unordered) of each row's k smallest values, equal values taken lowest index first.

    The k that a stable sort of the row puts first, so a result set never depends on how
    a partial sort picks among values tied at the cut-off (identical or quantised embeddings;
    ``argpartition`` alone took arbitrary ones of them, and the evaluation's rank counting,
    which orders ties by index, then saw a set it would not have chosen). ``0 < k < len(row)``.

    One ``argpartition`` places both the k-th and the (k+1)-th smallest value (no slower than
    placing one): where they differ, every copy of the k-th value is among the first k, and
    the partition is the answer. Only rows where they are equal (real embeddings tie only on
    duplicates, so there are rarely any) are selected again: their values below the k-th,
    plus as many of its copies as fit, lowest index first.
    """
    part = np.argpartition(d, (k - 1, k), axis=1)
    kth = np.take_along_axis(d, part[:, k - 1 : k], 1)
    rows = np.flatnonzero(np.take_along_axis(d, part[:, k : k + 1], 1) == kth)
    part = part[:, :k]
    if len(rows):
        d, kth = d[rows], kth[rows]
        taken = np.count_nonzero(np.take_along_axis(d, part[rows], 1) == kth, axis=1)
        eq = d == kth
        keep = (d < kth) | (eq & (np.cumsum(eq, axis=1) <= taken[:, None]))
        part[rows] = np.nonzero(keep)[1].reshape(len(rows), k)  # row-major: each row's k columns, ascending
    return part


class ExactIndex:
    """Brute force with :func:`~facesearch.nets.distances.squared_distances`, in chunks of queries."""

    def __init__(self, gallery: np.ndarray, chunk: int = 256):
        self.gallery = _as_f32(gallery)
        self.g_sq = (self.gallery**2).sum(1)
        self.chunk = chunk

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_f32(queries)
        n = len(self.gallery)
        k = min(k, n)
        dist = np.empty((len(queries), k), np.float32)
        idx = np.empty((len(queries), k), np.int64)
        for s in range(0, len(queries), self.chunk):
            q = queries[s : s + self.chunk]
            d2 = squared_distances(q, self.gallery, self.g_sq)
            # The query's norm added after the product, not as a_sq: this index's float order since
            # it was written, so its distances and its order of near-ties stay what they were.
            d2 += (q**2).sum(1)[:, None]
            part = lowest_k(d2, k) if k < n else np.tile(np.arange(n), (len(q), 1))
            pd = np.take_along_axis(d2, part, 1)
            # Ties (identical embeddings) ordered by gallery index, the rule the
            # evaluation's exact rank counting uses too.
            order = np.lexsort((part, pd), axis=1)
            idx[s : s + len(q)] = np.take_along_axis(part, order, 1)
            dist[s : s + len(q)] = np.sqrt(np.maximum(np.take_along_axis(pd, order, 1), 0))
        return dist, idx


class KDTreeIndex:
    """scipy ``cKDTree``; queries run on all cores (``workers=-1``). Ties by gallery index, as :class:`ExactIndex`.

    The tree returns equal distances in its own traversal order, and at the k-th distance any
    of the tied items, so each row is asked for one more than k: where that one is as far as
    the k-th, the row is asked again for twice as many, up to the whole gallery, until every
    item tied at the k-th distance is in hand; then each row keeps its first k by (distance,
    gallery index).
    """

    def __init__(self, gallery: np.ndarray, leafsize: int = 32):
        from scipy.spatial import cKDTree

        self.n = len(gallery)
        self.tree = cKDTree(_as_f32(gallery).astype(np.float64), leafsize=leafsize)

    def _query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self.tree.query(queries, k=k, workers=-1)
        if k == 1:  # scipy squeezes the k axis for k == 1
            dist, idx = dist[:, None], idx[:, None]
        return dist, idx

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        queries = np.asarray(queries, dtype=np.float64)
        out_d, out_i = np.empty((len(queries), k)), np.empty((len(queries), k), np.int64)
        rows, width = np.arange(len(queries) if k else 0), min(k + 1, self.n)
        while len(rows):
            dist, idx = self._query(queries[rows], width)
            order = np.lexsort((idx, dist), axis=1)[:, :k]
            out_d[rows], out_i[rows] = np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)
            # Rows whose last item is as far as the k-th may hold more items that far beyond it.
            rows = rows[dist[:, -1] == dist[:, k - 1]] if width < self.n else rows[:0]
            width = min(2 * width, self.n)
        return out_d.astype(np.float32), out_i


class FaissIndex:
    """FAISS ``flat`` (exact), ``hnsw`` or ``ivf`` index on L2 distance (see the module docstring)."""

    def __init__(self, gallery: np.ndarray, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64,
                 ivf_lists: int = 0, nprobe: int = 16):  # fmt: skip
        try:
            import faiss
        except ImportError as exc:
            raise RuntimeError("search backend faiss needs `pip install -r requirements-search.txt`") from exc
        self.faiss = faiss
        gallery = _as_f32(gallery)
        d = gallery.shape[1]
        self.n, self.kind = len(gallery), kind
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m)
            self.ef_search = ef_search
        elif kind == "ivf":
            # k-means needs a training point per list, so a small gallery gets fewer lists.
            self.nlist = max(1, min(ivf_lists or int(4 * np.sqrt(self.n)), self.n))
            self.quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(self.quantizer, d, self.nlist)
            index.train(gallery)
            self.nprobe = min(nprobe, self.nlist)
        else:
            raise ValueError(f"faiss_index must be flat, hnsw or ivf, not {kind!r}")
        index.add(gallery)
        if kind == "ivf":
            invlists = faiss.extract_index_ivf(index).invlists
            self.list_sizes = np.array([invlists.list_size(i) for i in range(self.nlist)], dtype=np.int64)
        self.index = index

    def _search(self, queries: np.ndarray, k: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search with ``budget`` lists probed (ivf) or candidates explored (hnsw).

        Passed per call as search parameters, not set on the index, so concurrent searches
        with different k do not change each other's budget.
        """
        if self.kind == "ivf":
            return self.index.search(queries, k, params=self.faiss.SearchParametersIVF(nprobe=int(budget)))
        return self.index.search(queries, k, params=self.faiss.SearchParametersHNSW(efSearch=int(budget)))

    def ivf_probes(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Lists each query probes: at least ``nprobe``, and enough of its nearest to hold k vectors.

        Rounded up to ``nprobe`` times a power of two (capped at every list), so the queries
        search in a few groups rather than one FAISS call per distinct count.
        """
        _, order = self.quantizer.search(_as_f32(queries), self.nlist)  # every list, nearest first
        held = np.cumsum(self.list_sizes[order], axis=1)
        need = (held < k).sum(1) + 1  # k <= N, so the last column always holds k
        doublings = np.ceil(np.log2(np.maximum(need / self.nprobe, 1.0)))
        return np.minimum(self.nprobe * 2 ** doublings.astype(np.int64), self.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_f32(queries)
        k = min(k, self.n)
        if self.kind == "flat":
            d2, idx = self.index.search(queries, k)
        else:
            if self.kind == "ivf":
                budgets, most = self.ivf_probes(queries, k), self.nlist
            else:
                budgets, most = np.full(len(queries), max(self.ef_search, k)), self.n
            d2 = np.empty((len(queries), k), np.float32)
            idx = np.empty((len(queries), k), np.int64)
            for b in np.unique(budgets):
                rows = np.flatnonzero(budgets == b)
                d2[rows], idx[rows] = self._search(queries[rows], k, b)
            # Still short (IVF: the coarse ranking inside FAISS broke a near-tie between lists
            # differently; HNSW: the graph walk reached fewer than k nodes): double the budget for
            # those rows up to exhaustive (every list; a walk free to visit every node).
            short = np.flatnonzero((idx < 0).any(1))
            budget = int(budgets.max(initial=1))
            while len(short) and budget < most:
                budget = min(2 * budget, most)
                d2[short], idx[short] = self._search(queries[short], k, budget)
                short = short[(idx[short] < 0).any(1)]
        return np.sqrt(np.maximum(d2, 0)).astype(np.float32), idx.astype(np.int64)


def check_neighbours(idx: np.ndarray, n_queries: int, k: int, n_gallery: int) -> None:
    """Raise unless ``idx`` is (n_queries, k) gallery indices in [0, n_gallery).

    FAISS marks a result it could not find with -1; used as an index, that silently
    reads the last gallery image's label, so a short answer must fail here instead.
    """
    idx = np.asarray(idx)
    if idx.shape != (n_queries, k):
        raise ValueError(f"search returned neighbours of shape {idx.shape}, expected {(n_queries, k)}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_gallery):
        rows = int(((idx < 0) | (idx >= n_gallery)).any(1).sum())
        raise ValueError(
            f"search returned fewer than k={k} real neighbours (index -1 or out of range) for {rows} of "
            f"{n_queries} queries in a gallery of {n_gallery}; raise nprobe / ef_search or use an exact backend"
        )


class CheckedIndex:
    """A backend whose every answer is checked by :func:`check_neighbours`: min(k, N) real neighbours."""

    def __init__(self, index: SearchIndex, n_gallery: int):
        self.index, self.n = index, n_gallery

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        dist, idx = self.index.search(queries, k)
        check_neighbours(idx, len(queries), min(k, self.n), self.n)
        return dist, idx


def build_index(
    gallery: np.ndarray, backend: str = "exact", faiss_index: str = "flat", **faiss_options
) -> CheckedIndex:
    """The search index ``backend`` (one of :data:`BACKENDS`) over ``gallery`` embeddings (N, d).

    ``faiss_options`` (``hnsw_m``, ``ef_search``, ``ivf_lists``, ``nprobe``) go to :class:`FaissIndex`.
    """
    if faiss_options and backend != "faiss":
        raise ValueError(f"options {sorted(faiss_options)} apply to the faiss backend only, not {backend!r}")
    if backend == "exact":
        index: SearchIndex = ExactIndex(gallery)
    elif backend == "ckdtree":
        index = KDTreeIndex(gallery)
    elif backend == "faiss":
        index = FaissIndex(gallery, faiss_index, **faiss_options)
    else:
        raise ValueError(f"unknown search backend {backend!r}; choose from {BACKENDS}")
    return CheckedIndex(index, len(gallery))


def cosine_similarity(distance: np.ndarray) -> np.ndarray:
    """Cosine similarity of L2-normalised embeddings from their Euclidean distance."""
    return 1.0 - np.asarray(distance, dtype=np.float64) ** 2 / 2.0
