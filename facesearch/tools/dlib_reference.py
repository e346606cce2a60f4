"""dlib's own face recognition pipeline on the pipeline's split: the reference.

    python -m facesearch dlib-reference --data DIR --split data/split --out metrics/dlib_reference.json \
        [--set test|val] [--jitters N] [--save-embeddings DIR]

For every image of the set: the original photo, the face box the crop stage
recorded (dlib's HOG detector when ``crop.detector: dlib_hog``), dlib's
68-point shape predictor in that box, then
``face_recognition_model_v1.compute_face_descriptor(photo, shape, jitters)``,
which cuts the 150x150 chip (padding 0.25) and runs the network, all inside
dlib. The descriptors are scored exactly like the pipeline's embeddings (same
metric functions), so the port, zero-shot and fine-tuned, can be compared
with dlib itself:

- ``--set test`` (default): the split's query.parquet against gallery.parquet, the
  evaluate stage's protocol;
- ``--set val``: the validation identities (val.parquet), never tested on, so
  preprocessing can be chosen on them: one seeded query per identity
  (:func:`facesearch.retrieval.protocol.choose_queries`, ``--seed``), the rest gallery.

Both also report ``loo_*``: every image of the set queries all the others.
``--jitters N`` is dlib's ``num_jitters``: the descriptor is the mean over N
randomly jittered copies of the chip (dlib's own generator, default-seeded per
process, so a run is repeatable); 0 and 1 both mean the plain chip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from facesearch.data import manifest as M
from facesearch.data.images import decode_image
from facesearch.faces.dlib_models import RECOGNITION_MODEL, find_model_file
from facesearch.faces.landmarks import shape_predictor
from facesearch.io import atomic_path, write_parquet_atomic
from facesearch.retrieval import rerank as R
from facesearch.retrieval.metrics import evaluate, readable
from facesearch.retrieval.protocol import choose_queries

SETS = ("test", "val")
ROLE = "role"  # saved tables: query or gallery


def set_tables(split: str | Path, name: str, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(query, gallery) tables of a set of the split: ``test`` as the split wrote them, ``val`` seeded."""
    split = Path(split)
    if name == "test":
        return pd.read_parquet(split / "query.parquet"), pd.read_parquet(split / "gallery.parquet")
    if name == "val":
        return choose_queries(pd.read_parquet(split / "val.parquet"), np.random.default_rng(seed))
    raise ValueError(f"set must be one of {SETS}, not {name!r}")


def dlib_descriptors(
    table: pd.DataFrame, data_root: str, points: int = 68, padding: float = 0.25, jitters: int = 0
) -> np.ndarray:
    """(N, 128) raw dlib descriptors of the recorded face of each row of a manifest-shaped table."""
    import dlib

    predictor = shape_predictor(points)
    net = dlib.face_recognition_model_v1(str(find_model_file(RECOGNITION_MODEL)))
    out = np.zeros((len(table), 128), np.float32)
    for i, row in enumerate(tqdm(table.itertuples(index=False), total=len(table), desc="dlib", unit="img")):
        row = row._asdict()
        rgb = np.ascontiguousarray(decode_image((Path(data_root) / row[M.IMAGE_PATH]).read_bytes(), 10**9).rgb)
        x, y, w, h = (int(row[c]) for c in (M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H))
        shape = predictor(rgb, dlib.rectangle(x, y, x + w - 1, y + h - 1))
        out[i] = np.asarray(net.compute_face_descriptor(rgb, shape, jitters, padding))
    return out


def score(
    query: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray,
    rerank: R.RerankParams | None = None,
) -> dict:  # fmt: skip
    """The evaluate stage's identity metrics and ``loo_*`` of L2-normalised ``query``/``gallery``.

    dlib's raw descriptors have norms ~1.2-1.3; ranking by cosine vs raw L2 differs only in
    that normalisation, which the pipeline's embeddings have too. ``rerank``: searched and
    re-ranked as the evaluate stage does (``evaluate.rerank``), so dlib's descriptors can have
    the same search as the port's embeddings.
    """
    rerank = rerank or R.RerankParams()
    qn, gn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (query, gallery))
    index = R.build_rerank_index(R.prepare(gn, rerank))
    metrics, _, _ = evaluate(qn, q_labels, gn, g_labels, index, ks=(10, 20, 50, 100))
    metrics.update(R.loo_metrics(qn, q_labels, gn, g_labels, rerank), rerank=rerank.method)
    return metrics


def save_descriptors(folder: str | Path, name: str, descriptors: np.ndarray, table: pd.DataFrame) -> None:
    """``<folder>/<name>.npy`` (N, 128) float32 raw descriptors and ``<name>.parquet``, row i naming row i.

    The table holds each row's crop_path (the pipeline's key of an image), identity and
    role (query or gallery), so another tool can join, re-rank or re-score them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, descriptors.astype(np.float32))
    write_parquet_atomic(folder / f"{name}.parquet", table[[M.CROP_PATH, M.IDENTITY, ROLE]].reset_index(drop=True))


def reference_metrics(
    query_table: pd.DataFrame, gallery_table: pd.DataFrame, data_root: str, points: int = 68, jitters: int = 0,
    rerank: R.RerankParams | None = None,
) -> tuple[dict, np.ndarray, pd.DataFrame]:  # fmt: skip
    """(metrics, raw descriptors, their table: query rows then gallery rows with a role column).

    The metrics are the evaluate stage's identity metrics and ``loo_*`` for dlib's own pipeline.
    """
    table = pd.concat([query_table.assign(**{ROLE: "query"}), gallery_table.assign(**{ROLE: "gallery"})],
                      ignore_index=True)  # fmt: skip
    desc = dlib_descriptors(table, data_root, points, jitters=jitters)
    nq = len(query_table)
    labels = table[M.IDENTITY].to_numpy()
    metrics = score(desc[:nq], labels[:nq], desc[nq:], labels[nq:], rerank)
    metrics["pipeline"] = (f"dlib: recorded box, {points}-point shape predictor, compute_face_descriptor"
                           + (f" with {jitters} jitters" if jitters > 1 else ""))  # fmt: skip
    return readable(metrics), desc, table
