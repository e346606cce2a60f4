"""The app's latency from uploaded bytes to 9 results, model forward included.

    python bench/app.py                      # 40k gallery, the pipeline's trained models
    python bench/app.py --gallery 200000

Per photo: check and decode the bytes, detect faces, crop, embed with the
model, search the gallery. The gallery is ``--gallery`` synthetic 128-d
embeddings (the size the target names; the pipeline's own sample gallery is
small); the photos are the built-in sample's. Baseline in the same run: the
same path with the original design's cKDTree index instead of exact search.
Target: p50 at most 200 ms on this CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facesearch import app_core as core  # noqa: E402
from facesearch.search import ExactIndex, KDTreeIndex  # noqa: E402


def run(model, index, photos: list[bytes], settings, gallery) -> np.ndarray:
    times = []
    for data in photos:
        t0 = time.perf_counter()
        image = core.read_upload(data)
        detection = core.find_faces(image, settings)
        face = core.crop_face(image, detection.chosen, settings)
        core.search(model, core.Gallery(gallery.embeddings, index, gallery.table, gallery.attributes), face)
        times.append((time.perf_counter() - t0) * 1000)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=40_000)
    parser.add_argument("--photos", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    photo_paths = sorted((ROOT / "data" / "sample" / "img_celeba").glob("*.jpg"))[: args.photos]
    if not photo_paths or not core.available(ROOT):
        raise SystemExit("run `dvc repro` first: the benchmark uses the pipeline's models and sample photos")
    photos = [p.read_bytes() for p in photo_paths]
    settings = core.crop_settings(ROOT)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(args.gallery, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    print(f"{len(photos)} sample photos, gallery of {args.gallery} embeddings, {torch.get_num_threads()} threads")
    for backbone, state in core.available(ROOT):
        if state != "after":
            continue
        model = core.load_embedder(ROOT, backbone, state)
        real = core.load_gallery(ROOT, backbone, state)
        # Attribute rows cycle the real gallery's so result formatting costs what it does in the app.
        reps = -(-args.gallery // len(real.table))
        table = real.table.iloc[np.tile(np.arange(len(real.table)), reps)[: args.gallery]].reset_index(drop=True)
        gallery = core.Gallery(emb, ExactIndex(emb), table, np.tile(real.attributes, (reps, 1))[: args.gallery])
        run(model, gallery.index, photos[:3], settings, gallery)  # warm-up
        exact = run(model, gallery.index, photos, settings, gallery)
        kd = run(model, KDTreeIndex(emb), photos, settings, gallery)
        print(f"{backbone:13s} ({model.config.img_size} px) exact: p50 {np.percentile(exact, 50):6.1f} ms "
              f"p99 {np.percentile(exact, 99):6.1f} ms | cKDTree baseline p50 {np.percentile(kd, 50):6.1f} ms "
              f"| ratio {np.percentile(kd, 50) / np.percentile(exact, 50):.2f}x | "
              f"p50 / 200 ms budget = {np.percentile(exact, 50) / 200:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
