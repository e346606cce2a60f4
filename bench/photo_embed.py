"""Photo to embeddings per core: each pretrained model's whole path, as the index runs it, in one run.

    python bench/photo_embed.py --data ../shared/data/celeba-dev --n 200 [--models dlib_resnet,sface,dlib_sface]

For every model of ``python -m facesearch pretrained`` (written to a temporary folder first) the
same photos go through the photo index's one path (``facesearch.gallery.embedder.file_faces`` then
``Embedder.embed``): decode, detect every face, cut each with the model's crop settings, embed with
its test-time flip. One thread for OpenCV and torch; speed is photos per second of the process's
CPU time, so per core even on a shared machine. Prints each model's photos/s, faces found, and its
speed against the first model, measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import facesearch  # noqa: F401  (before torch: sets how its threads wait, facesearch/__init__.py)
from facesearch.data.celeba import find_image_dir, list_images
from facesearch.data.images import ImageRejected
from facesearch.gallery.embedder import LIMITS, Embedder, file_faces
from facesearch.nets.models import save_model
from facesearch.tools import pretrained as P


def photo_paths(data: Path, n: int, seed: int) -> list[Path]:
    folder = find_image_dir(data) if (data / "img_celeba").is_dir() else data
    paths = sorted(folder / name for name in list_images(folder))
    random.Random(seed).shuffle(paths)
    return paths[:n]


def run(embedder: Embedder, photos: list[bytes]) -> tuple[float, int]:
    """(CPU seconds, faces embedded) for the whole path over ``photos``."""
    faces = 0
    start = time.process_time()
    for data in photos:
        try:
            _, boxes, crops, _ = file_faces(data, embedder.settings, LIMITS)
        except ImageRejected:
            continue
        if len(boxes):
            embedder.embed(crops)
            faces += len(boxes)
    return time.process_time() - start, faces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a photo folder (CelebA layout or plain)")
    parser.add_argument("--n", type=int, default=200, help="photos, drawn seeded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="dlib_resnet,sface,dlib_sface", help="pretrained names; first: baseline")
    args = parser.parse_args()
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    photos = [p.read_bytes() for p in photo_paths(Path(args.data), args.n, args.seed)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, extra = P.build(name)
            path = Path(tmp) / f"{name}.pt"
            save_model(path, model, extra=extra)
            embedder = Embedder.load(path)
            run(embedder, photos[:3])  # warm: first-call costs (model file reads, OpenCV init) are not per photo
            seconds, faces = run(embedder, photos)
            rows.append((name, len(photos) / seconds, faces))
    base = rows[0][1]
    print(f"{len(photos)} photos of {args.data}, one thread, photos per CPU-second:")
    for name, speed, faces in rows:
        print(f"  {name:12s} {speed:6.2f} photos/s  {faces:4d} faces  {speed / base:4.2f}x {rows[0][0]}")


if __name__ == "__main__":
    main()
