"""Gallery-side re-ranking of search results (issue 14): ``evaluate.rerank``.

Re-ranking is a post-processing step of nearest-neighbour search that also looks at the
gallery's own neighbourhoods. It is split in two, so that it cannot leak:

- :func:`prepare` builds a :class:`GalleryStructure` from the gallery alone, once (the
  gallery's k-NN graph and what derives from it). It never sees a query, and it can be
  saved to and loaded from a folder of ``.npy`` files, so a DVC stage can output it.
- :class:`RerankIndex` (``search(queries, k) -> (distances, indices)``, the
  :class:`facesearch.retrieval.knn.SearchIndex` contract) answers each query from the query's own
  distances to the gallery plus that fixed structure. One query never changes the structure
  or another query's answer, whatever the batch.

Methods (``RerankParams.method``):

``none``
    The base search, unchanged.

``dba_qe`` — database-side augmentation and alpha-query expansion (Radenović et al., "Fine-tuning
CNN image retrieval with no human annotation", 2018). DBA replaces each gallery vector ``x``
by ``normalise(x + sum_j w_j x_j)`` over its top-``n`` gallery neighbours ``x_j``; QE does the
same to the query with its top-``n`` results in the DBA gallery, then searches the DBA gallery
again. Plain (``adaptive: false``): ``w_j = max(cos(x, x_j), 0) ** alpha`` for all ``n``, the
vector itself weighing 1 (= cos(x, x) ** alpha). Returned distances are Euclidean, expanded
query to DBA vectors.

With a fixed ``n`` this hurts on a gallery where most people have one or two photos (a
private LFW-like evaluation, n=3: mAP 0.917 -> 0.815, Rank-1 0.929 -> 0.761): a lone photo's
nearest neighbours are other people, and averaging with them pulls look-alikes together.
So by default (``adaptive: true``) expansion is **adaptive**:

1. *Similarity floor relative to the item's own neighbourhood* (DBA and QE). ``b`` is the
   item's ``background``-th nearest gallery item, a rank at which its neighbourhood is mostly
   other people; a neighbour weighs ``w_j = max((s_j - s_b) / (1 - s_b), 0) ** alpha`` with
   ``s`` the cosine similarity: 0 at or below the background, 1 for an identical vector. A lone
   photo's look-alikes are barely more similar than its background, so they weigh little and
   it barely moves; a person's other photos stand out and weigh more. (A neighbour weighs
   exactly 0 only at or below the background's similarity; the item itself always weighs 1.)
2. *Mutual* (QE only): a result ``g`` is used only if the query would be among ``g``'s own top
   ``n`` gallery neighbours, i.e. the raw query-to-``g`` distance is at most ``g``'s precomputed
   raw distance to its ``n``-th neighbour. Tested in the raw space, where query and gallery
   vectors are alike: DBA vectors are averages and sit closer to each other than any raw query
   does. A query none of whose results passes is left exactly as it is (its first search is
   its answer). This keeps QE from following a wrong first result on a gallery of lone photos.
   DBA has no mutual test: in trials on the synthetic galleries of ``bench/rerank.py`` (n=3) it
   made expansion patchy (some vectors averaged, their equally good neighbours not), averaged
   vectors then out-ranked unaveraged true matches, and DBA alone went from +0.04 to -0.05 mAP
   on the one-or-two-photos gallery and from +0.09 to +0.02 on the many-photos one.

On the synthetic galleries of ``bench/rerank.py`` the adaptive default raises mAP on both the
many-photos and the one-or-two-photos kind, where plain fixed-``n`` DBA + QE lowers it on the
latter; the numbers are in that benchmark's output.

``k_reciprocal`` — k-reciprocal re-ranking (Zhong et al., CVPR 2017), gallery-side variant.
``N(p, k)`` is ``p`` and its ``k`` nearest gallery items; ``R(p, k)`` those ``g`` in ``N(p, k)``
with ``p`` in ``N(g, k)``. For a gallery item every set is gallery-only. For a query, ``g`` in
its top ``k1`` is in ``R(q, k1)`` when ``d(q, g) <= r_g``, ``g``'s precomputed distance to its
``k1``-th gallery neighbour: the query would be in ``g``'s top ``k1`` were it added, but it is
never added, so it changes no gallery neighbourhood. ``R*(p)`` adds to ``R(p, k1)`` every
``R(c, round(k1 / 2))`` (precomputed, gallery) of a ``c`` in ``R(p, k1)`` that shares more than
2/3 of its members with ``R(p, k1)``. ``V_p`` weighs ``R*(p)`` by ``exp(-d^2)``, normalised to sum
1; local query expansion averages ``V`` over ``p`` and its ``k2 - 1`` nearest gallery items. The
re-ranked distance of a candidate is ``(1 - lambda) * jaccard(V_q, V_g) + lambda * d^2 / 2``.
Two departures from the paper, both to be leak-free and batch-independent: weights and the
original term use ``d^2`` (``d^2 / 2`` = cosine distance of unit vectors) instead of ``d^2``
divided by the largest distance in the probe+gallery matrix, and the query is not a
coordinate of ``V`` (gallery vectors are built without it). Only the base top-``candidates``
are re-ranked; every image beyond keeps the base order, with Jaccard distance taken as 1 (it
shares no neighbourhood the search found), so distances stay ascending and mAP over the
whole gallery is defined. Memory: sparse sets (CSR) and chunked work; no G x G matrix.

Embeddings are assumed L2-normalised (cosine similarity is read from Euclidean distance).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import sparse

from facesearch.retrieval.knn import CheckedIndex, ExactIndex, build_index, cosine_similarity
from facesearch.retrieval.metrics import leave_one_out_metrics as plain_leave_one_out
from facesearch.retrieval.metrics import loo_metrics as plain_loo_metrics
from facesearch.retrieval.metrics import loo_queries, padded_rank_scores, summary

METHODS = ("none", "k_reciprocal", "dba_qe")


@dataclass(frozen=True)
class RerankParams:
    """``params.yaml: evaluate.rerank``; ``lambda`` is spelled ``lam`` here (a Python keyword)."""

    method: str = "none"
    candidates: int = 100  # k_reciprocal: base top-K that is re-ranked; the rest keeps base order
    k1: int = 20  # k_reciprocal: depth of the reciprocal sets
    k2: int = 6  # k_reciprocal: local query expansion over the item and its k2 - 1 nearest
    lam: float = 0.3  # k_reciprocal: weight of the original distance against the Jaccard distance
    n: int = 3  # dba_qe: expansion neighbours per item
    alpha: float = 1.0  # dba_qe: exponent of the neighbour weights
    adaptive: bool = True  # dba_qe: weights relative to the background similarity; QE mutual results only
    background: int = 20  # dba_qe adaptive: rank of the neighbour whose similarity is the floor
    loo_max_photos: int = 5000  # leave_one_out_metrics re-ranks up to this many photos (one structure per query)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"rerank method must be one of {METHODS}, not {self.method!r}")
        for name in ("candidates", "k1", "k2", "background", "loo_max_photos"):
            if getattr(self, name) < 1:
                raise ValueError(f"rerank {name} must be at least 1, not {getattr(self, name)}")
        if self.n < 0 or not 0 <= self.lam <= 1 or self.alpha <= 0:
            raise ValueError(f"rerank needs n >= 0, 0 <= lambda <= 1, alpha > 0; got {self}")

    def as_params(self) -> dict:
        """As ``params.yaml`` spells it (``lambda``, not ``lam``)."""
        out = asdict(self)
        out["lambda"] = out.pop("lam")
        return out

    @classmethod
    def from_dict(cls, params: dict | None, backbone: str | None = None) -> RerankParams:
        """From ``params.yaml: evaluate.rerank``; ``method_by_backbone[backbone]``, if listed, is the method."""
        params = dict(params or {})
        by_backbone = params.pop("method_by_backbone", None) or {}
        if backbone in by_backbone:
            params["method"] = by_backbone[backbone]
        if "lambda" in params:
            params["lam"] = params.pop("lambda")
        unknown = set(params) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown rerank params {sorted(unknown)}")
        return cls(**params)


@dataclass
class GalleryStructure:
    """What re-ranking precomputes from the gallery alone; see the module docstring.

    ``gallery`` is the raw gallery (float32). dba_qe: ``expanded`` the DBA vectors, and when
    adaptive ``qe_radius`` (each raw gallery vector's distance to its n-th raw neighbour, for
    the query's mutual test). k_reciprocal: ``radius`` (distance to the k1-th neighbour),
    ``near`` (the k2 - 1 nearest neighbours), ``half`` (the sets R(g, round(k1/2)), 0/1), ``v``
    (R* weights, rows sum to 1) and ``v_qe`` (``v`` after local query expansion), the last three
    CSR over the gallery.
    """

    params: RerankParams
    gallery: np.ndarray
    expanded: np.ndarray | None = None
    qe_radius: np.ndarray | None = None
    radius: np.ndarray | None = None
    near: np.ndarray | None = None
    half: sparse.csr_matrix | None = None
    v: sparse.csr_matrix | None = None
    v_qe: sparse.csr_matrix | None = None

    _DENSE = ("gallery", "expanded", "qe_radius", "radius", "near")
    _SPARSE = ("half", "v", "v_qe")

    def save(self, folder: str | Path) -> None:
        """``params.json`` plus one ``.npy`` per array (CSR matrices as ``name.{data,indices,indptr}``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self._DENSE:
            if (arr := getattr(self, name)) is not None:
                np.save(folder / f"{name}.npy", arr)
        for name in self._SPARSE:
            if (mat := getattr(self, name)) is not None:
                for part in ("data", "indices", "indptr"):
                    np.save(folder / f"{name}.{part}.npy", getattr(mat, part))
        # Written last: a folder with params.json is complete.
        (folder / "params.json").write_text(json.dumps(asdict(self.params), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> GalleryStructure:
        folder = Path(folder)
        params = RerankParams(**json.loads((folder / "params.json").read_text()))
        out = cls(params, np.load(folder / "gallery.npy"))
        n = len(out.gallery)
        for name in cls._DENSE[1:]:
            if (folder / f"{name}.npy").is_file():
                setattr(out, name, np.load(folder / f"{name}.npy"))
        for name in cls._SPARSE:
            if (folder / f"{name}.data.npy").is_file():
                parts = [np.load(folder / f"{name}.{p}.npy") for p in ("data", "indices", "indptr")]
                setattr(out, name, sparse.csr_matrix(tuple(parts), shape=(n, n)))
        return out


def neighbour_graph(x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``min(depth, N - 1)`` nearest other rows (distances, indices), nearest first.

    One exact search of the gallery against itself (:class:`ExactIndex`, chunked), dropping
    each row's own entry; a row that is not among its own nearest (more identical copies than
    ``depth``) drops its last entry instead, so every row keeps the same count.
    """
    n = len(x)
    kk = min(depth + 1, n)
    dist, idx = ExactIndex(x).search(x, kk)
    is_self = idx == np.arange(n)[:, None]
    keep = ~is_self
    keep[~is_self.any(1), -1] = False
    return dist[keep].reshape(n, kk - 1), idx[keep].reshape(n, kk - 1)


def _mutual(idx: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """(N, k) bool: row i is among the first k neighbours of its own m-th neighbour idx[i, m].

    By rank, not by distance, so it is exactly symmetric (a distance computed in i's row and
    in j's can differ in the last bit).
    """
    k = min(k, idx.shape[1])
    out = np.empty((len(idx), k), bool)
    for s in range(0, len(idx), chunk):
        own = np.arange(s, min(s + chunk, len(idx)))
        out[own] = (idx[idx[own, :k], :k] == own[:, None, None]).any(-1)
    return out


def _pair_sq_dist(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 65536):
    """||a[rows] - b[cols]||^2 for the listed pairs only, chunked (a few per item, not all pairs)."""
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), chunk):
        diff = a[rows[s : s + chunk]] - b[cols[s : s + chunk]]
        out[s : s + chunk] = np.einsum("ij,ij->i", diff, diff)
    return out


def _weights(dist: np.ndarray, background: np.ndarray | None, alpha: float) -> np.ndarray:
    """Expansion weights of neighbours at ``dist``: cos^alpha (plain), or relative to the
    similarity of each row's ``background`` neighbour (adaptive; see the module docstring)."""
    s = cosine_similarity(dist)
    if background is None:
        return np.maximum(s, 0.0) ** alpha
    s_b = cosine_similarity(background)[:, None]
    return (np.maximum(s - s_b, 0.0) / np.maximum(1.0 - s_b, 1e-12)) ** alpha


def _expand_with(x: np.ndarray, base: np.ndarray, nbr: np.ndarray, w: np.ndarray) -> np.ndarray:
    """normalise(x + sum_j w_j base[nbr_j]) per row; rows with no weight stay exactly x."""
    out = np.array(x, dtype=np.float32)
    rows = np.flatnonzero((w > 0).any(1))
    for s in range(0, len(rows), 4096):
        r = rows[s : s + 4096]
        mixed = x[r] + np.einsum("ij,ijd->id", w[r], base[nbr[r]])
        out[r] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    return out


def _background(dist: np.ndarray, rank: int) -> np.ndarray:
    """Each row's distance to its ``rank``-th neighbour (the last one if there are fewer)."""
    return dist[:, min(rank, dist.shape[1]) - 1]


def graph_depth(p: RerankParams) -> int:
    """How many nearest gallery neighbours of each item the structure of ``p`` is built from."""
    if p.method == "dba_qe":
        return max(p.n, p.background) if p.adaptive else p.n
    if p.method == "k_reciprocal":
        return max(p.k1, p.k2 - 1)
    return 0


def _dba(x: np.ndarray, p: RerankParams, dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """DBA vectors and, when adaptive, every raw vector's distance to its n-th neighbour."""
    n = min(p.n, idx.shape[1])
    if n == 0:  # a gallery of one
        return x.copy(), np.full(len(x), np.inf, np.float32) if p.adaptive else None
    w = _weights(dist[:, :n], _background(dist, p.background) if p.adaptive else None, p.alpha)
    # With fewer than n others, a query is always among a gallery item's top n.
    radius = (dist[:, p.n - 1].copy() if p.n <= idx.shape[1] else np.full(len(x), np.inf, np.float32)) \
        if p.adaptive else None  # fmt: skip
    return _expand_with(x, x, idx[:, :n], w), radius


def _sets(idx: np.ndarray, k: int) -> sparse.csr_matrix:
    """R(g, k) for every gallery item: itself and its first k neighbours that have it in their first k."""
    n = len(idx)
    k = min(k, idx.shape[1])
    keep = _mutual(idx, k)
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), k)[keep.ravel()]])
    cols = np.concatenate([np.arange(n), idx[:, :k][keep]])
    return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))


def _expand_sets(r: sparse.csr_matrix, half: sparse.csr_matrix) -> sparse.csr_matrix:
    """R*: each row of ``r`` plus every half set of a member that shares > 2/3 of itself with the row."""
    r = r.tocsr()
    coo = r.tocoo()
    sub = half[coo.col]  # the member's half set, one row per (row, member) pair
    shared = np.asarray(sub.multiply(r[coo.row]).sum(1)).ravel()
    accept = shared > 2.0 / 3.0 * np.diff(sub.indptr)
    pick = sparse.csr_matrix(
        (np.ones(int(accept.sum()), np.float32), (coo.row[accept], coo.col[accept])), shape=r.shape
    )
    out = (r + pick @ half).tocsr()
    out.data[:] = 1.0
    return out


def _weigh(members: sparse.csr_matrix, src: np.ndarray, gallery: np.ndarray) -> sparse.csr_matrix:
    """V: members weighted by exp(-d^2) to their row's vector ``src[row]``, each row summing to 1."""
    coo = members.tocoo()
    w = np.exp(-_pair_sq_dist(src, gallery, coo.row, coo.col))
    v = sparse.csr_matrix((w, (coo.row, coo.col)), shape=members.shape)
    sums = np.asarray(v.sum(1)).ravel()
    return sparse.diags(np.where(sums > 0, 1.0 / np.maximum(sums, 1e-30), 0.0).astype(np.float32)) @ v


def _local_qe(v_self: sparse.csr_matrix, v: sparse.csr_matrix, near: np.ndarray) -> sparse.csr_matrix:
    """Mean of each row's own V and the V of its ``near`` gallery neighbours (k2 items in all)."""
    b, m = near.shape
    pick = sparse.csr_matrix(
        (np.ones(b * m, np.float32), (np.repeat(np.arange(b), m), near.ravel())), shape=(b, v.shape[0])
    )
    return ((v_self + pick @ v) / (m + 1)).astype(np.float32).tocsr()


def _k_reciprocal(struct: GalleryStructure, dist: np.ndarray, idx: np.ndarray, chunk: int = 8192) -> None:
    p, x = struct.params, struct.gallery
    k2 = p.k2 - 1
    width = idx.shape[1]
    # A query enters g's top k1 when nearer than g's k1-th neighbour; with fewer than k1 others, always.
    struct.radius = dist[:, p.k1 - 1].copy() if p.k1 <= width else np.full(len(x), np.inf, np.float32)
    struct.near = idx[:, : min(k2, width)].copy()
    struct.half = _sets(idx, int(np.around(p.k1 / 2)))
    full = _sets(idx, p.k1)
    parts = [
        _weigh(_expand_sets(full[s : s + chunk], struct.half), x[s : s + chunk], x) for s in range(0, len(x), chunk)
    ]
    struct.v = sparse.vstack(parts).tocsr()
    struct.v_qe = _local_qe(struct.v, struct.v, struct.near)


def prepare(
    gallery: np.ndarray, params: RerankParams | dict | None = None, graph: tuple[np.ndarray, np.ndarray] | None = None
) -> GalleryStructure:
    """The :class:`GalleryStructure` of ``gallery`` (N, d) for ``params``; reads no query.

    ``graph``: the gallery's :func:`neighbour_graph` at least :func:`graph_depth` deep, when the
    caller has it (:func:`without` derives a smaller gallery's from a larger one's); else computed.
    """
    p = params if isinstance(params, RerankParams) else RerankParams.from_dict(params)
    struct = GalleryStructure(p, np.ascontiguousarray(gallery, dtype=np.float32))
    if p.method == "none":
        return struct
    norms = np.linalg.norm(struct.gallery, axis=1)
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        # Its weights and radii read cosine similarity off Euclidean distance: on raw vectors
        # they would silently rank by something else.
        raise ValueError(f"rerank {p.method} needs L2-normalised embeddings (train.<backbone>.normalize: true); "
                         f"these have norms {norms.min():.3g} to {norms.max():.3g}: set evaluate.rerank.method none "
                         "for this backbone")  # fmt: skip
    depth = min(graph_depth(p), len(gallery) - 1)
    dist, idx = neighbour_graph(struct.gallery, depth) if graph is None else graph
    if len(dist) != len(gallery) or dist.shape[1] < depth:
        raise ValueError(f"rerank: a graph of shape {dist.shape} given for {len(gallery)} items, {depth} deep")
    dist, idx = dist[:, :depth], idx[:, :depth]
    if p.method == "dba_qe":
        struct.expanded, struct.qe_radius = _dba(struct.gallery, p, dist, idx)
    else:
        _k_reciprocal(struct, dist, idx)
    return struct


def without(graph: tuple[np.ndarray, np.ndarray], drop: int) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour graph of the gallery without item ``drop``, from the gallery's own graph.

    Every other row loses ``drop`` from its list and keeps its first ``depth - 1`` (rows that
    did not list it) or all remaining (rows that did) entries, renumbered past ``drop``: the
    graph of the smaller gallery exactly, one level shallower than the one given (ties aside:
    an exact search orders equal distances by index, and removing one item keeps that order).
    """
    dist, idx = graph
    rows = np.flatnonzero(np.arange(len(idx)) != drop)
    d, i = dist[rows], idx[rows]
    keep = i != drop
    keep[keep.all(1), -1] = False  # rows that did not list it: their deepest entry goes
    depth = idx.shape[1] - 1
    i = i[keep].reshape(len(rows), depth)
    return d[keep].reshape(len(rows), depth), i - (i > drop)


class RerankIndex:
    """A :class:`facesearch.retrieval.knn.SearchIndex` that re-ranks with a fixed :class:`GalleryStructure`.

    ``backend`` (and its options) is the base search of :func:`facesearch.retrieval.knn.build_index`,
    over the raw gallery (none, k_reciprocal) or the DBA vectors (dba_qe). Queries are handled in
    chunks of ``chunk``; each query's answer depends on that query and the structure only.
    """

    def __init__(self, structure: GalleryStructure, backend: str = "exact", chunk: int = 64, **options):
        self.s, self.p, self.chunk = structure, structure.params, chunk
        self.n = len(structure.gallery)
        vectors = structure.expanded if self.p.method == "dba_qe" else structure.gallery
        self.base = build_index(vectors, backend, **options)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.p.method == "none":
            return self.base.search(queries, k)
        k = min(k, self.n)
        dist = np.empty((len(queries), k), np.float32)
        idx = np.empty((len(queries), k), np.int64)
        step = self._qe if self.p.method == "dba_qe" else self._k_reciprocal
        for s in range(0, len(queries), self.chunk):
            dist[s : s + self.chunk], idx[s : s + self.chunk] = step(queries[s : s + self.chunk], k)
        return dist, idx

    def _qe(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, p = self.s, self.p
        n = min(p.n, self.n)
        dist, idx = self.base.search(q, max(k, n, p.background if p.adaptive else 0))
        w = _weights(dist[:, :n], _background(dist, p.background) if p.adaptive else None, p.alpha)
        if p.adaptive and n:
            # Mutual, in the raw space: the query would be among each result's own top n.
            raw = _pair_sq_dist(q, s.gallery, np.repeat(np.arange(len(q)), n), idx[:, :n].ravel())
            w = np.where(raw.reshape(len(q), n) <= s.qe_radius[idx[:, :n]] ** 2, w, 0.0)
        moved = np.flatnonzero((w > 0).any(1))
        expanded_q = _expand_with(q[moved], s.expanded, idx[moved, :n], w[moved])
        dist, idx = dist[:, :k].copy(), idx[:, :k].copy()
        if len(moved):  # the others' first search is already their answer
            dist[moved], idx[moved] = self.base.search(expanded_q, k)
        return dist, idx

    def query_sets(self, dist: np.ndarray, idx: np.ndarray) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
        """R(q, k1) and R*(q) (0/1 rows over the gallery) from the queries' base results, nearest first."""
        s, k1 = self.s, min(self.p.k1, self.n)
        b = len(idx)
        # g joins when the query would enter g's top k1: nearer than g's precomputed k1-th neighbour.
        keep = dist[:, :k1] <= s.radius[idx[:, :k1]]
        members = sparse.csr_matrix(
            (np.ones(int(keep.sum()), np.float32), (np.repeat(np.arange(b), k1)[keep.ravel()], idx[:, :k1][keep])),
            shape=(b, self.n),
        )
        return members, _expand_sets(members, s.half)

    def _k_reciprocal(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, p = self.s, self.p
        b = len(q)
        cand = min(p.candidates, self.n)
        dist, idx = self.base.search(q, max(k, cand, p.k1, p.k2 - 1))
        v_q = _weigh(self.query_sets(dist, idx)[1], q, s.gallery)
        v_q = _local_qe(v_q, s.v, idx[:, : min(p.k2 - 1, self.n)])
        # Jaccard over the candidates: sum(min) / sum(max), sum(max) = sum(a) + sum(b) - sum(min).
        # min() is non-zero only where V_g is: walk the candidates' sparse rows, each entry against
        # the query's row (dense, chunk x N).
        rows = s.v_qe[idx[:, :cand].ravel()]
        pair = np.repeat(np.arange(b * cand), np.diff(rows.indptr))  # (query, candidate) of each entry
        mins = np.minimum(rows.data, v_q.toarray()[pair // cand, rows.indices])
        shared = np.bincount(pair, mins, minlength=b * cand)
        total = np.repeat(np.asarray(v_q.sum(1)).ravel(), cand) + np.asarray(rows.sum(1)).ravel() - shared
        jac = np.where(total > 0, 1.0 - shared / np.where(total > 0, total, 1.0), 1.0).reshape(b, cand)
        blended = (1 - p.lam) * jac + p.lam * dist[:, :cand].astype(np.float64) ** 2 / 2
        # Re-ranked candidates, equal distances in base order; the rest after them, in base order.
        order = np.lexsort((np.broadcast_to(np.arange(cand), (b, cand)), blended), axis=1)
        out_idx = np.concatenate([np.take_along_axis(idx[:, :cand], order, 1), idx[:, cand:]], 1)[:, :k]
        tail = (1 - p.lam) + p.lam * dist[:, cand:].astype(np.float64) ** 2 / 2
        out_dist = np.concatenate([np.take_along_axis(blended, order, 1), tail], 1)[:, :k]
        return out_dist.astype(np.float32), out_idx


def build_rerank_index(structure: GalleryStructure, backend: str = "exact", **options) -> CheckedIndex:
    """:class:`RerankIndex` checked like :func:`facesearch.retrieval.knn.build_index`: min(k, N) real neighbours."""
    return CheckedIndex(RerankIndex(structure, backend, **options), len(structure.gallery))


def rerank(structure: GalleryStructure, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked (distances, indices), nearest first, of ``queries`` with exact base search.

    Builds the base index on every call; to search repeatedly keep a :func:`build_rerank_index`.
    """
    return build_rerank_index(structure).search(queries, k)


def leave_one_out_metrics(
    emb: np.ndarray, labels: np.ndarray, params: RerankParams | dict | None = None, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float] | None:
    """:func:`facesearch.retrieval.metrics.leave_one_out_metrics` with every search re-ranked, leak-free.

    Each image queries a gallery of all the others whose structure is built without it (from
    the graph of all images, :func:`without`: the gallery's exact graph, not recomputed), so
    no query ever enters its own gallery's neighbourhoods. One structure per query: ``None``
    above ``params.loo_max_photos`` images (the caller reports plain leave-one-out instead).
    Identities with one image do not query, as there.
    """
    p = params if isinstance(params, RerankParams) else RerankParams.from_dict(params)
    labels = np.asarray(labels)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if p.method == "none":
        return plain_leave_one_out(emb, labels, ks)
    if len(emb) > p.loo_max_photos:
        return None
    _, q_idx, r_max = loo_queries(labels)
    if len(q_idx) == 0:
        return {**{f"rank{k}": float("nan") for k in ks}, "mAP": float("nan")}
    n = len(emb)
    graph = neighbour_graph(emb, min(graph_depth(p) + 1, n - 1))
    ranks = np.full((len(q_idx), r_max), np.iinfo(np.int64).max, np.int64)
    for row, i in enumerate(q_idx.tolist()):
        others = np.flatnonzero(np.arange(n) != i)
        index = RerankIndex(prepare(emb[others], p, without(graph, i)))
        _, order = index.search(emb[i : i + 1], n - 1)
        own = np.flatnonzero(labels[others][order[0]] == labels[i]) + 1  # 1-based, ascending
        ranks[row, : len(own)] = own
    return summary(*padded_rank_scores(ranks), ks)


def loo_metrics(query: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray,
                params: RerankParams) -> dict:  # fmt: skip
    """``loo_*`` over query and gallery together, re-ranked by ``params`` up to its photo limit.

    Plain (:func:`facesearch.retrieval.metrics.loo_metrics`) above ``params.loo_max_photos``;
    ``loo_reranked`` says which, ``loo_queries`` how many photos took part.
    """
    emb, labels = np.concatenate([query, gallery]), np.concatenate([q_labels, g_labels])
    loo = leave_one_out_metrics(emb, labels, params) if params.method != "none" else None
    if loo is None:
        return {**plain_loo_metrics(query, q_labels, gallery, g_labels), "loo_reranked": False}
    return {**{f"loo_{k}": v for k, v in loo.items()}, "loo_queries": len(labels), "loo_reranked": True}
