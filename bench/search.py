"""Search and evaluation speed at the report's size, and single-query latency for the app.

    python bench/search.py                 # 2,020 queries x 37,253 gallery images, 128-d
    python bench/search.py --per-query 100 # how many queries the slow per-query loop times
    python bench/search.py --quick         # the backend comparison only (no whole evaluation, no 200k)

Embeddings are made to look like a face index: identity centres on the unit
sphere, photos scattered around them, L2-normalised; about 18 gallery photos
per query identity, as in the report's split. In one run it times top-1000
search (the largest k of the report) with:
- per-query cKDTree (the report's approach, one ``query`` call per photo; timed
  on ``--per-query`` queries and scaled to all, which the output says),
- batched cKDTree (one call, all cores),
- batched exact search (matrix product + partial sort; the project's default),
- FAISS flat / HNSW / IVF when ``faiss`` is installed (``requirements-search.txt``),
and prints the ratios. Then, per backend (exact, cKDTree, FAISS flat / HNSW / IVF
with their default settings), recall@k against exact search, batch seconds
(index build + top-k of every query) and single-query p50 at report size (k=9,
as the app asks), each with its ratio to exact (the p50s timed round-robin, so load on a
shared machine slows every backend alike). Then single-query latency
(p50/p99, k=9) at 40k and 200k gallery images. The last line is
``eval_seconds=<the whole evaluation, every k, mAP and attribute metrics
included, at report size, with the project's method>``: the slowest of three
indexes from a good model's to a near-random one's.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facesearch.retrieval.knn import ExactIndex, KDTreeIndex, build_index
from facesearch.retrieval.metrics import evaluate


def face_like(n_ids: int, n_gallery: int, dim: int, rng: np.random.Generator, noise: float = 0.09):
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    g_labels = np.sort(rng.integers(0, n_ids, size=n_gallery))
    g_labels[:n_ids] = np.arange(n_ids)  # every identity has at least one gallery photo
    gallery = centres[g_labels] + rng.normal(scale=noise, size=(n_gallery, dim))
    query = centres + rng.normal(scale=noise, size=(n_ids, dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    return query.astype(np.float32), np.arange(n_ids), gallery.astype(np.float32), g_labels


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k that ``found`` holds."""
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def interleaved_p50(indexes: dict, queries: np.ndarray, k: int = 9) -> dict[str, float]:
    """Single-query p50 (ms) of each index, timed in turn on every query.

    Round-robin rather than one index after another, so a burst of load on this shared
    machine slows every index alike and the ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in indexes}
    for q in queries:
        for name, index in indexes.items():
            t0 = time.perf_counter()
            index.search(q[None, :], k)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: float(np.percentile(t, 50)) for name, t in times.items()}


def latency(index, queries: np.ndarray, k: int = 9) -> tuple[float, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2020)
    parser.add_argument("--gallery", type=int, default=37253)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--per-query", type=int, default=50, help="queries timed in the per-query cKDTree loop")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="only the backend comparison at report size")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    query, _, gallery, _ = face_like(args.queries, args.gallery, args.dim, rng)
    print(f"{args.queries} queries x {args.gallery} gallery, {args.dim}-d, top-{args.k}")

    # The whole evaluation on indexes from good to near-random: the poorer the model, the more
    # same-identity photos fall outside the top 1000 and have their exact rank counted for mAP.
    # The slowest is the figure reported.
    worst = 0.0
    models = (("good model", 0.09), ("mediocre model", 0.16), ("near-random model", 0.2))
    for label, noise in () if args.quick else models:
        q, ql, g, gl = face_like(args.queries, args.gallery, args.dim, np.random.default_rng(2), noise)
        attrs = rng.integers(0, 2, size=(args.queries, 40)).astype(np.float64)
        g_attrs = attrs[gl] * (rng.random((args.gallery, 40)) > 0.1)
        runs = [timed(lambda q=q, ql=ql, g=g, gl=gl, attrs=attrs, g_attrs=g_attrs: evaluate(
            q, ql, g, gl, build_index(g, "exact"), ks=(10, 20, 50, 100, 1000), query_attrs=attrs, gallery_attrs=g_attrs,
        )) for _ in range(2)]  # fmt: skip
        t_eval, (metrics, _, _) = min(runs, key=lambda r: r[0])  # best of 2: this machine's timings are noisy
        worst = max(worst, t_eval)
        print(f"whole evaluation, {label:17s} (rank1={metrics['rank1']:.3f} mAP={metrics['mAP']:.3f}, "
              f"recall@1000={metrics['recall@1000']:.3f}): {t_eval:.3f} s")  # fmt: skip

    build_kd, kd = timed(lambda: KDTreeIndex(gallery))
    sub = query[: args.per_query]
    t_loop, _ = timed(lambda: [kd.search(q[None, :], args.k) for q in sub])
    per_query_all = t_loop / len(sub) * len(query)
    t_kd, (_, kd_idx) = timed(lambda: kd.search(query, args.k))
    build_ex, ex = timed(lambda: ExactIndex(gallery))
    t_ex, (_, ex_idx) = timed(lambda: ex.search(query, args.k))
    same = float((kd_idx == ex_idx).mean())
    rows = [
        (f"per-query cKDTree (timed on {len(sub)}, scaled)", build_kd + per_query_all),
        ("batched cKDTree", build_kd + t_kd),
        ("batched exact", build_ex + t_ex),
    ]
    # backend -> (index, batch seconds, top-k): the same runs feed both tables.
    backends = {"exact": (ex, build_ex + t_ex, ex_idx), "ckdtree": (kd, build_kd + t_kd, kd_idx)}
    if find_spec("faiss"):
        # Defaults, and IVF probing 8x more lists: at k=1000 the defaults' recall is poor.
        for name, kind, options in (("flat", "flat", {}), ("hnsw", "hnsw", {}), ("ivf", "ivf", {}),
                                    ("ivf nprobe 128", "ivf", {"nprobe": 128})):  # fmt: skip
            t_build, index = timed(lambda kind=kind, options=options: build_index(gallery, "faiss", kind, **options))
            t_search, (_, f_idx) = timed(lambda index=index: index.search(query, args.k))
            backends[f"faiss {name}"] = (index, t_build + t_search, f_idx)
            rows.append((f"faiss {name} (recall@{args.k} vs exact {recall(f_idx, ex_idx):.3f})", t_build + t_search))
    else:
        print("faiss not installed: skipped (pip install -r requirements-search.txt)")
    exact_s = build_ex + t_ex
    for name, seconds in rows:
        print(f"{name:48s} {seconds:9.3f} s   {seconds / exact_s:8.1f}x exact")
    print(f"cKDTree and exact return the same top-{args.k} neighbours for {100 * same:.2f}% of positions")

    lat_q = query[: args.latency_queries]
    p50s = interleaved_p50({name: index for name, (index, _, _) in backends.items()}, lat_q)
    # recall@10 from the first 10 of the same top-k: the part Rank-1/5/10 and the app's 9 results read.
    print(f"\nper backend at {args.gallery} gallery: recall@10 and @{args.k} vs exact (same top-{args.k}), batch = "
          f"build + top-{args.k} of {args.queries} queries, single query p50 (k=9, {len(lat_q)} queries)")  # fmt: skip
    for name, (_, seconds, idx) in backends.items():
        p50 = p50s[name]
        r10, rk = recall(idx[:, :10], ex_idx[:, :10]), recall(idx, ex_idx)
        print(f"{name:20s} recall@10 {r10:.3f}  @{args.k} {rk:.3f}   batch {seconds:7.3f} s {seconds / exact_s:6.2f}x"
              f"   p50 {p50:7.3f} ms {p50 / p50s['exact']:6.2f}x")  # fmt: skip
    if "faiss ivf" in backends:
        ivf = backends["faiss ivf"][0].index
        probes = ivf.ivf_probes(query, args.k)
        print(f"faiss ivf: {ivf.nlist} lists, nprobe {ivf.nprobe}; for k={args.k} each query probed "
              f"{probes.min()}-{probes.max()} lists (mean {probes.mean():.1f}) to hold k vectors")  # fmt: skip
    if args.quick:
        return

    for n in (40_000, 200_000):
        q, _, g, _ = face_like(2000, n, args.dim, np.random.default_rng(1))
        for name, index in (("exact", ExactIndex(g)), ("ckdtree", KDTreeIndex(g))):
            p50, p99 = latency(index, q[: args.latency_queries])
            print(f"single query, k=9, {n:7d} gallery, {name:8s} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")

    print(f"eval_seconds={worst:.3f}")


if __name__ == "__main__":
    main()
