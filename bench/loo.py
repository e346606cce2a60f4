"""Leave-one-out metrics at CelebA's test size: the project's method against the previous one.

    python bench/loo.py                                   # 40,000 and 5,000 photos, 128-d, ~20 per identity
    python bench/loo.py --sizes 5000 --memory             # one size; peak memory of the new method too
    python bench/loo.py --real ../shared/.../dlib_resnet  # also embeddings on disk (see --real)

Embeddings are ``bench/search.py``'s face-like ones (identity centres on the unit sphere,
photos scattered around them, L2-normalised float32), query and gallery pooled into one
leave-one-out set: N / 20 identities, ~20 photos each. At every size the set is scored by

- the previous method (kept here as the baseline, not in the package): a batched
  ``searchsorted`` of every distance into the query's sorted relevant distances, a
  histogram of where they land, and a pass over every tied image;
- :func:`facesearch.retrieval.metrics.leave_one_out_metrics`: rows sorted by value, each relevant
  distance found in its sorted row, ties counted on the unsorted row only where they occur;

each line prints both times, their ratio, and whether the metrics are equal (``==`` on the
floats: both methods must give the same numbers, not close ones). At the smallest size two
tie-heavy sets are added: coarsely quantised embeddings, and a collapsed model (every
embedding equal). Target: at most 20 s at 40,000 photos on this 2-core CPU.

``--real DIR``: every ``{before,after}_{query,gallery}.npy`` pair in DIR with the
``query.parquet`` / ``gallery.parquet`` tables beside them (the evaluate stage's ``loo_*``
set: query and gallery pooled), compared the same way.

``--memory``: peak memory the new method allocates at each size (numpy reports its buffers
to ``tracemalloc``), timed separately so tracing does not slow the comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import facesearch  # noqa: F401  (before torch: sets how its threads wait, facesearch/__init__.py)

# isort: split
import numpy as np
import pandas as pd
import torch
from search import face_like  # bench/search.py

from facesearch.data import manifest as M
from facesearch.nets.distances import squared_distances
from facesearch.retrieval.metrics import leave_one_out_metrics, loo_queries, padded_rank_scores, summary


def previous_leave_one_out(emb, labels, ks=(1, 5, 10), chunk=1024) -> dict[str, float]:
    """The method before this one (commit 5eeef60), the baseline: same distances, same sums."""
    labels = np.asarray(labels)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    members, q_idx, r_max = loo_queries(labels)
    g_sq = (emb**2).sum(1)
    first = np.empty(len(q_idx), np.int64)
    ap = np.empty(len(q_idx), np.float64)
    for start in range(0, len(q_idx), chunk):
        rows = q_idx[start : start + chunk]
        c = len(rows)
        d2 = squared_distances(emb[rows], emb, g_sq)
        d2[np.arange(c), rows] = np.inf
        rel = np.full((c, r_max), -1, np.int64)
        for row, i in enumerate(rows.tolist()):
            own = members[labels[i].item()]
            own = own[own != i]
            rel[row, : len(own)] = own
        valid = rel >= 0
        rel_d = np.where(valid, np.take_along_axis(d2, np.maximum(rel, 0), 1), np.inf).astype(np.float32)
        srt = np.lexsort((np.where(valid, rel, np.iinfo(np.int64).max), rel_d), axis=1)
        rel, rel_d, valid = (np.take_along_axis(a, srt, 1) for a in (rel, rel_d, valid))
        t_rel = torch.from_numpy(np.ascontiguousarray(rel_d))
        t_d2 = torch.from_numpy(d2)
        pos = torch.searchsorted(t_rel, t_d2, right=True)
        hist = torch.zeros((c, r_max + 1), dtype=torch.int64).scatter_add_(1, pos, torch.ones_like(pos))
        below = torch.cumsum(hist, 1)[:, :r_max].numpy()
        pos_np = pos.numpy()
        at = np.take_along_axis(rel_d, np.maximum(pos_np - 1, 0), 1)
        tie_rows, tie_cols = np.nonzero((at == d2) & (pos_np > 0))
        if len(tie_rows):
            d_tie = d2[tie_rows, tie_cols]
            for p in range(r_max):
                hit = (rel_d[tie_rows, p] == d_tie) & (tie_cols < rel[tie_rows, p]) & valid[tie_rows, p]
                np.add.at(below[:, p], tie_rows[hit], 1)
        first[start : start + c], ap[start : start + c] = padded_rank_scores(
            np.where(valid, below + 1, np.iinfo(np.int64).max)
        )
    return summary(first, ap, ks)


def face_like_set(n: int, dim: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """N face-like embeddings of N / 20 identities (``bench/search.py``'s query and gallery pooled)."""
    n_ids = n // 20
    query, q_labels, gallery, g_labels = face_like(n_ids, n - n_ids, dim, rng, noise)
    return np.concatenate([query, gallery]), np.concatenate([q_labels, g_labels])


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def compare(name: str, emb: np.ndarray, labels: np.ndarray) -> bool:
    t_old, old = timed(previous_leave_one_out, emb, labels)
    t_new, new = timed(leave_one_out_metrics, emb, labels)
    same = old == new
    print(f"{name:40s} previous {t_old:7.2f} s   new {t_new:6.2f} s   {t_old / t_new:5.1f}x   "
          f"equal {same}   mAP {new['mAP']:.4f} rank1 {new['rank1']:.4f}", flush=True)  # fmt: skip
    return same


def peak_mb(emb: np.ndarray, labels: np.ndarray) -> float:
    tracemalloc.start()
    leave_one_out_metrics(emb, labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def real_sets(directory: Path):
    """(name, embeddings, labels) per ``<state>_query.npy`` / ``<state>_gallery.npy`` pair in ``directory``."""
    q_labels = np.asarray(pd.read_parquet(directory / "query.parquet")[M.IDENTITY])
    g_labels = np.asarray(pd.read_parquet(directory / "gallery.parquet")[M.IDENTITY])
    for q_path in sorted(directory.glob("*_query.npy")):
        state = q_path.name.removesuffix("_query.npy")
        emb = np.concatenate([np.load(q_path), np.load(directory / f"{state}_gallery.npy")])
        yield f"{directory.name} {state} ({len(emb)} photos)", emb, np.concatenate([q_labels, g_labels])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="40000,5000", help="photos in each leave-one-out set, comma-separated")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.12, help="per-dimension scatter around identity centres")
    parser.add_argument("--real", type=Path, action="append", default=[], help="a folder of embeddings (repeatable)")
    parser.add_argument("--memory", action="store_true", help="also the new method's peak memory per size")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    all_equal = True
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        emb, labels = face_like_set(n, args.dim, rng, args.noise)
        all_equal &= compare(f"face-like, {n} photos", emb, labels)
        if args.memory:
            print(f"{'':40s} new method's peak memory {peak_mb(emb, labels):.0f} MB", flush=True)
        if n == min(sizes):
            # Quantised: many images at exactly a relevant image's distance, ordered by index.
            all_equal &= compare(f"quantised (ties), {n} photos", np.round(emb * 4) / 4, labels)
            all_equal &= compare(f"collapsed (all tied), {n} photos", np.ones_like(emb) / np.sqrt(args.dim), labels)
    for directory in args.real:
        for name, emb, labels in real_sets(directory):
            all_equal &= compare(name, emb, labels)
    print(f"all_equal={all_equal}")
    if not all_equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
