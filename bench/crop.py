"""Crop-stage speed: the report's naive Haar settings vs the project's, same images, one core.

    python bench/crop.py --data ../shared/data/celeba-dev --n 200

Baseline (the report's settings): ``detectMultiScale(scaleFactor=1.1, minNeighbors=5,
minSize=(30, 30))`` on the full-resolution grayscale photo, again with
``scaleFactor=1.05`` when that does not find exactly one face; kept when exactly
one. Ours: ``facesearch.faces.haar.detect_face`` with ``params.yaml: crop.haar``.
Both decode the same bytes with the same decoder and run on one core
(``cv2.setNumThreads(1)``), so images/s is per core. Prints images/s, keep rate
and the speed ratio.

With dlib installed (``requirements-face.txt``) it also times the aligned paths
end to end (detect, landmarks, chip), beside Haar with its square crop:
Haar + 5-point alignment, and dlib's own pipeline (HOG + 68 points), the
ratio printed against the Haar crop path.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facesearch.data.celeba import find_image_dir, list_images
from facesearch.data.images import ImageRejected, decode_image
from facesearch.faces.config import FaceConfig, face_crop, find_faces
from facesearch.faces.cropping import CropLimits, read_photo
from facesearch.faces.haar import FRONTAL_CASCADE, detect_face, load_cascade
from facesearch.params import load_params


def naive_keep(rgb) -> bool:
    cascade = load_cascade(FRONTAL_CASCADE)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(30, 30))
    if len(faces) != 1:
        faces = cascade.detectMultiScale(gray, scaleFactor=1.05, minNeighbors=5, minSize=(30, 30))
    return len(faces) == 1


def crop_fn(cfg: FaceConfig):
    """Detect and cut the crop (or chip) the crop stage would write, minus the JPEG encode."""

    def keep(rgb) -> bool:
        det = find_faces(rgb, cfg)
        return det.chosen is not None and face_crop(rgb, det.chosen, cfg) is not None

    return keep


def run(name, keep_fn, blobs, max_pixels: int = 40_000_000) -> tuple[float, float]:
    start = time.perf_counter()
    kept = 0
    for data in blobs:
        try:
            rgb = decode_image(data, max_pixels).rgb
        except ImageRejected:
            continue
        kept += bool(keep_fn(rgb))
    seconds = time.perf_counter() - start
    ips, rate = len(blobs) / seconds, kept / len(blobs)
    print(f"{name:34s} {ips:8.2f} images/s  keep rate {rate:.3f}  ({seconds:.1f} s)", flush=True)
    return ips, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/celeba-dev", help="CelebA-layout folder")
    parser.add_argument("--n", type=int, default=200, help="images, seeded random sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    image_dir = find_image_dir(args.data)
    names = list_images(image_dir)
    names = sorted(random.Random(args.seed).sample(names, min(args.n, len(names))))
    crop_params = load_params(args.params)["crop"]
    limits = CropLimits.from_params(crop_params)
    blobs = []  # read once: time decode + detect only; within crop.max_file_bytes, as the stage reads
    for n in names:
        try:
            blobs.append(read_photo(image_dir / n, limits.max_file_bytes))
        except ImageRejected as exc:
            print(f"skipped {n}: {exc}")
    cfg = FaceConfig.from_params(crop_params).haar  # with crop.policy
    print(f"{len(blobs)} images from {image_dir}, one core")
    ours, ours_rate = run(f"facesearch ({cfg.policy})", lambda rgb: detect_face(rgb, cfg).chosen is not None, blobs)
    other = "single" if cfg.policy == "largest" else "largest"
    cfg_other = replace(cfg, policy=other)
    run(f"facesearch ({other})", lambda rgb: detect_face(rgb, cfg_other).chosen is not None, blobs)
    base, base_rate = run("baseline (report settings + retry)", naive_keep, blobs)
    print(f"speed ratio facesearch/baseline = {ours / base:.1f}x; keep rate {ours_rate:.3f} vs {base_rate:.3f}")
    try:
        import dlib  # noqa: F401
    except ImportError:
        print("dlib not installed (pip install -r requirements-face.txt): aligned paths not timed")
        return
    face = FaceConfig.from_params({**crop_params, "detector": "haar", "align": "none"})
    haar_crop, _ = run("haar + square crop", crop_fn(face), blobs)
    paths = [
        ("haar + 5-point chip 150", FaceConfig.from_params({**crop_params, "align": "landmarks", "landmarks": 5,
                                                             "detector": "haar", "size": 150})),
        ("dlib_hog + 68-point chip 150", FaceConfig.from_params({**crop_params, "align": "landmarks", "landmarks": 68,
                                                                  "detector": "dlib_hog", "size": 150})),
    ]  # fmt: skip
    for name, face in paths:
        ips, _ = run(name, crop_fn(face), blobs)
        print(f"  speed ratio {name} / haar + square crop = {ips / haar_crop:.2f}x")


if __name__ == "__main__":
    main()
