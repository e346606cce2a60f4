"""The photo index's costs: adding photos to a large index, and searching 100k faces.

    python bench/index.py --model models/mobilenet_v2.pt
    python bench/index.py --model models/resnet50.pt --faces 10000 --photos 100 --search-faces 100000

(a) ``index add`` of ``--photos`` new photos (the built-in sample's renderer)
to an index of ``--faces`` faces, against embedding those photos alone (the
same per-photo path, :func:`facesearch.gallery.build.embed_files`: read, hash, decode,
detect, crop, forward pass; model load included in both). The difference is
what the index adds: loading it, checking the model's fingerprint, validating,
writing the whole new version and switching to it, and extending the search
structure (nothing for exact search; inserting into the stored graph for HNSW).
The large index is made of synthetic unit vectors with the model's width and
one face per photo; each timing adds to a fresh copy of it, the two timed in
turn ``--repeats`` times (medians), for the exact and for the HNSW structure.
Target: add <= 1.5x the embedding alone.

(b) Single-query search (k=9, as ``search`` asks) at ``--search-faces``
face-like 128-d vectors (bench/search.py's identity clusters), exact and HNSW
(the index's settings), p50 timed round-robin, HNSW's recall@1 and @10 against
exact, and the time to load each structure from a written index version
(what every ``search`` command pays before its first query).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facesearch.data.layouts import list_photo_files
from facesearch.data.synth import SampleSpec, generate_sample
from facesearch.gallery import build as XB
from facesearch.gallery import embedder as XE
from facesearch.gallery import store as X
from facesearch.retrieval.knn import CheckedIndex, FaissIndex, build_index

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_search", ROOT / "bench" / "search.py")
bench_search = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_search)


def synthetic_version(folder: Path, n: int, embedder: XE.Embedder | None, dim: int, hnsw_threshold: int,
                      rng: np.random.Generator, vectors: np.ndarray | None = None) -> None:  # fmt: skip
    """An index of ``n`` photos of one face each (``vectors`` or random unit ones), written as a real version."""
    emb = vectors if vectors is not None else XE.unit(rng.normal(size=(n, dim)))
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    rel = [f"synthetic/{i:07d}.jpg" for i in range(n)]
    root = "/synthetic"
    photo_table = pd.DataFrame({X.ROOT: root, X.PHOTO: rel, X.SHA256: sha, X.PERSON: None, X.WIDTH: 300,
                                X.HEIGHT: 300, X.N_FACES: 1, X.REASON: None}).astype(X.PHOTO_DTYPES)  # fmt: skip
    faces = pd.DataFrame({X.ROOT: root, X.PHOTO: rel, X.SHA256: sha, X.FACE: 1, X.PERSON: None, X.BOX_X: 10,
                          X.BOX_Y: 10, X.BOX_W: 100, X.BOX_H: 100, X.DETECTOR: "haar_frontal"})  # fmt: skip
    faces = faces.astype(X.FACE_DTYPES)
    model = embedder.record() if embedder else {"path": "-", "fingerprint": "-", "backbone": "-", "embedding_dim": dim}
    record = {"format": X.FORMAT, "version": 1, "model": model, "hnsw_threshold": hnsw_threshold,
              "hnsw_m": X.HNSW_M, "ef_search": X.EF_SEARCH}  # fmt: skip
    graph = X.search_graph(emb, record, None, appended=False)
    with X.writing(folder):
        X.write_version(folder, record, emb, faces, photo_table, graph)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def add_cost(args, work: Path) -> None:
    photos = work / "new"
    generate_sample(SampleSpec(identities=max(1, args.photos // 10), images_per_identity=10, seed=11), photos)
    photo_dir = photos / "img_celeba"
    files = sorted(photo_dir.iterdir())[: args.photos]
    for extra in sorted(photo_dir.iterdir())[args.photos :]:
        extra.unlink()
    embedder = XE.Embedder.load(args.model)
    dim = embedder.model.config.embedding_dim
    rng = np.random.default_rng(0)
    listed, _ = list_photo_files(photo_dir)

    def alone():
        e = XE.Embedder.load(args.model)
        return XB.embed_files(listed, str(photo_dir), e, XE.LIMITS)

    alone()  # warm-up: first forward passes, cascades loaded, files in the page cache
    print(f"(a) index add of {len(files)} photos to a {args.faces}-face index vs embedding them alone "
          f"({embedder.model.config.backbone}, {embedder.size} px, {args.repeats} repeats, medians)")  # fmt: skip
    for structure, threshold in (("exact", X.DEFAULT_HNSW_THRESHOLD), ("hnsw", 1)):
        template = work / f"big_{structure}"
        synthetic_version(template, args.faces, embedder, dim, threshold, rng)
        t_alone, t_add = [], []
        for r in range(args.repeats):
            target = work / f"run_{structure}_{r}"
            shutil.copytree(template, target)
            t, batch = timed(alone)
            t_alone.append(t)
            t, report = timed(lambda target=target: XB.add(target, str(photo_dir)))
            t_add.append(t)
            shutil.rmtree(target)
        a, b = float(np.median(t_alone)), float(np.median(t_add))
        n_faces = sum(len(e) for e in batch.embeddings)
        print(f"    {structure:5s}: embed alone {a:6.2f} s, index add {b:6.2f} s ({report.added_faces} faces added, "
              f"{n_faces} embedded alone; index now {report.faces}), ratio {b / a:.2f}x (target <= 1.5x)")  # fmt: skip


def search_cost(args, work: Path) -> None:
    rng = np.random.default_rng(1)
    n_ids = args.search_faces // 10
    query, _, gallery, _ = bench_search.face_like(n_ids, args.search_faces, 128, rng)
    queries = query[rng.choice(len(query), args.queries, replace=False)]
    t_exact, exact = timed(lambda: build_index(gallery, "exact"))
    t_hnsw, hnsw = timed(
        lambda: CheckedIndex(FaissIndex(gallery, "hnsw", hnsw_m=X.HNSW_M, ef_search=X.EF_SEARCH), len(gallery))
    )
    p50 = bench_search.interleaved_p50({"exact": exact, "hnsw": hnsw}, queries, k=9)
    _, truth = exact.search(queries, 10)
    _, found = hnsw.search(queries, 10)
    r1 = bench_search.recall(found[:, :1], truth[:, :1])
    r10 = bench_search.recall(found, truth)
    print(f"(b) search, {args.search_faces} faces (128-d, {n_ids} identities), single query k=9, "
          f"{args.queries} queries (p50 round-robin)")  # fmt: skip
    print(f"    exact: p50 {p50['exact']:7.3f} ms (structure built in {t_exact:.2f} s)")
    print(f"    hnsw : p50 {p50['hnsw']:7.3f} ms (built in {t_hnsw:.2f} s, M={X.HNSW_M}, ef_search={X.EF_SEARCH}), "
          f"{p50['exact'] / p50['hnsw']:.1f}x faster; recall@1 {r1:.4f}, recall@10 {r10:.4f} vs exact")  # fmt: skip
    for structure, threshold in (("exact", args.search_faces + 1), ("hnsw", 1)):
        folder = work / f"search_{structure}"
        synthetic_version(folder, len(gallery), None, 128, threshold, rng, vectors=gallery)
        t_load, loaded = timed(lambda folder=folder: X.load_index(folder).structure())
        _, found = loaded.search(queries, 10)
        print(f"    {structure:5s}: a written index version loaded (tables, checks, structure) in {t_load:.2f} s; "
              f"its recall@10 vs exact {bench_search.recall(found, truth):.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mobilenet_v2.pt")
    parser.add_argument("--faces", type=int, default=10_000, help="(a) faces already in the index")
    parser.add_argument("--photos", type=int, default=100, help="(a) new photos added")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search-faces", type=int, default=100_000, help="(b) faces searched")
    parser.add_argument("--queries", type=int, default=200, help="(b) single queries timed")
    parser.add_argument("--skip-add", action="store_true", help="(b) only: no model needed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        if not args.skip_add:
            add_cost(args, Path(tmp))
        search_cost(args, Path(tmp))


if __name__ == "__main__":
    main()
