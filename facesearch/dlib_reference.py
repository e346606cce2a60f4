"""dlib's own face recognition pipeline on the pipeline's query/gallery split: the reference.

    python -m facesearch dlib-reference --data DIR --split data/split --out metrics/dlib_reference.json

For every query and gallery image: the original photo, the face box the crop
stage recorded (dlib's HOG detector when ``crop.detector: dlib_hog``), dlib's
68-point shape predictor in that box, then
``face_recognition_model_v1.compute_face_descriptor(photo, shape)``, which cuts
the 150x150 chip (padding 0.25) and runs the network, all inside dlib. The
descriptors are scored exactly like the pipeline's embeddings (same queries,
same gallery, same metrics), so the port, zero-shot and fine-tuned, can be
compared with dlib itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from facesearch import manifest as M
from facesearch.dlib_models import RECOGNITION_MODEL, SHAPE_PREDICTORS, find_model_file
from facesearch.images import decode_image
from facesearch.retrieval import evaluate, loo_metrics, readable
from facesearch.search import ExactIndex


def dlib_descriptors(table: pd.DataFrame, data_root: str, points: int = 68, padding: float = 0.25) -> np.ndarray:
    """(N, 128) raw dlib descriptors of the recorded face of each row of a manifest-shaped table."""
    import dlib

    predictor = dlib.shape_predictor(str(find_model_file(SHAPE_PREDICTORS[points])))
    net = dlib.face_recognition_model_v1(str(find_model_file(RECOGNITION_MODEL)))
    out = np.zeros((len(table), 128), np.float32)
    for i, row in enumerate(tqdm(table.itertuples(index=False), total=len(table), desc="dlib", unit="img")):
        row = row._asdict()
        rgb = np.ascontiguousarray(decode_image((Path(data_root) / row[M.IMAGE_PATH]).read_bytes(), 10**9).rgb)
        x, y, w, h = (int(row[c]) for c in (M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H))
        shape = predictor(rgb, dlib.rectangle(x, y, x + w - 1, y + h - 1))
        out[i] = np.asarray(net.compute_face_descriptor(rgb, shape, 0, padding))
    return out


def reference_metrics(query_table: pd.DataFrame, gallery_table: pd.DataFrame, data_root: str, points: int = 68) -> dict:
    """The evaluate stage's identity metrics (and ``loo_*``) for dlib's own pipeline."""
    q = dlib_descriptors(query_table, data_root, points)
    g = dlib_descriptors(gallery_table, data_root, points)
    ql, gl = query_table[M.IDENTITY].to_numpy(), gallery_table[M.IDENTITY].to_numpy()
    # L2-normalised like the pipeline's embeddings; dlib's raw descriptors have norms ~1.2-1.3,
    # and ranking by cosine vs raw L2 differs only in that normalisation.
    qn, gn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (q, g))
    metrics, _, _ = evaluate(qn, ql, gn, gl, ExactIndex(gn), ks=(10, 20, 50, 100))
    metrics.update(loo_metrics(qn, ql, gn, gl))
    metrics["pipeline"] = f"dlib: recorded box, {points}-point shape predictor, compute_face_descriptor"
    return readable(metrics)
