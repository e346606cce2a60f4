"""Crop-stage speed: YuNet vs Haar vs dlib HOG, each with the chip its backbone takes; and the report's Haar.

    python bench/crop.py [--data ../shared/data/celeba-dev] [--n 300]

One run, the same photos (a seeded sample of ``--data``: celeba-dev when it is there, else the
built-in sample ``data/sample``), decoded by the crop stage's decoder within its limits, on one core
(``cv2.setNumThreads(1)``). Speed is photos per second of this process's CPU time, so per core even
on a machine shared with other jobs (wall photos/s beside it). A photo is kept when the detector's
face survives ``crop.policy``, as in the crop stage. The paths, through the detector registry
(``facesearch.faces.config.find_faces``) with ``params.yaml: crop``'s settings, then the cut
(``face_crop``) a backbone takes from that detection:

- ``haar`` + the 218 px square crop (resnet50 / mobilenet_v2's ``chips`` default);
- ``dlib_hog`` + dlib's 68-point chip at 150 px (``chips.dlib_resnet``; needs dlib);
- ``yunet`` + the 112 px ArcFace chip from its own 5 landmarks (``chips.sface``; needs the zoo file),
  with ``crop.yunet``'s settings (``--yunet-sides``: also at other ``detect_side`` values).

Issue 28's target: YuNet detect + align >= 40 photos/s per core at >= 96% kept on celeba-dev.
Then, for reference, the report's naive Haar settings against the project's Haar pass (detection only).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facesearch.data.celeba import find_image_dir, list_images
from facesearch.data.images import ImageRejected, decode_image
from facesearch.faces.config import FaceConfig, detection_params, face_crop, find_faces
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
    """Detect and cut the chip ``cfg`` describes from the chosen face (and its landmarks), as the chips stage."""

    def keep(rgb) -> bool:
        det = find_faces(rgb, cfg)
        return det.chosen is not None and face_crop(rgb, det.chosen, cfg, det.landmarks_of(det.chosen)) is not None

    return keep


def run(name, keep_fn, blobs, max_pixels: int = 40_000_000) -> tuple[float, float]:
    """Photos per CPU second of this (single-threaded) process, and the keep rate.

    The first photo is run once untimed first: loading a model (YuNet's weights folded to float32,
    dlib's predictor) is a once-per-process cost, not a per-photo one.
    """
    for data in blobs[:1]:
        with contextlib.suppress(ImageRejected):
            keep_fn(decode_image(data, max_pixels).rgb)
    wall, cpu = time.perf_counter(), time.process_time()
    kept = 0
    for data in blobs:
        try:
            rgb = decode_image(data, max_pixels).rgb
        except ImageRejected:
            continue
        kept += bool(keep_fn(rgb))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ips, rate = len(blobs) / cpu, kept / len(blobs)
    print(f"{name:36s} {ips:7.2f} photos/s per core (wall {len(blobs) / wall:6.2f})  kept {rate:.3f}", flush=True)
    return ips, rate


def default_data() -> str:
    dev = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "celeba-dev"
    return str(dev) if dev.is_dir() else "data/sample"


PATHS = (  # name, detector, the chip cut from its detection (chips.<backbone>-shaped), what it needs
    ("haar + square crop 218", "haar", {"align": "none", "size": 218, "margin": 0.2}, None),
    ("dlib_hog + 68-point chip 150", "dlib_hog", {"align": "landmarks", "landmarks": 68, "size": 150}, "dlib"),
    ("yunet + ArcFace chip 112", "yunet", {"align": "arcface", "size": 112}, "yunet_int8bq"),
)


def available(need: str | None) -> str | None:
    """Why a path cannot run here, or None."""
    if need == "dlib":
        try:
            import dlib  # noqa: F401
        except ImportError:
            return "dlib not installed (pip install -r requirements-face.txt)"
    if need == "yunet_int8bq":
        from facesearch.faces import zoo

        if not zoo.available(need):
            return f"YuNet's file not installed ({zoo.MODELS[need].how_to_get()})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=default_data(), help="CelebA-layout folder (default: celeba-dev, else the sample)"
    )
    parser.add_argument("--n", type=int, default=300, help="photos, seeded random sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-baseline", action="store_true", help="skip the report's naive Haar settings")
    parser.add_argument(
        "--yunet-sides", default="", help="also time yunet at these crop.yunet.detect_side values, e.g. 480,320"
    )
    args = parser.parse_args()
    cv2.setNumThreads(1)
    image_dir = find_image_dir(args.data)
    names = list_images(image_dir)
    names = sorted(random.Random(args.seed).sample(names, min(args.n, len(names))))
    crop_params = load_params(args.params)["crop"]
    limits = CropLimits.from_params(crop_params)
    blobs = []  # read once: time decode + detect + cut only; within crop.max_file_bytes, as the stage reads
    for n in names:
        try:
            blobs.append(read_photo(image_dir / n, limits.max_file_bytes))
        except ImageRejected as exc:
            print(f"skipped {n}: {exc}")
    detection = detection_params(crop_params)
    print(f"{len(blobs)} photos from {image_dir}, one core, crop.policy {detection.get('policy')}, "
          f"crop.yunet {detection.get('yunet')}")  # fmt: skip
    speeds = {}
    for name, detector, chip, need in PATHS:
        why = available(need)
        if why:
            print(f"{name:36s} skipped: {why}")
            continue
        cfg = FaceConfig.from_params({**detection, "detector": detector, **chip})
        speeds[name] = run(name, crop_fn(cfg), blobs, limits.max_pixels)
    yunet_cfg = FaceConfig.from_params({**detection, "detector": "yunet", **PATHS[2][2]})
    for side in (int(v) for v in args.yunet_sides.split(",") if v):
        if PATHS[2][0] in speeds:
            cfg = replace(yunet_cfg, yunet=replace(yunet_cfg.yunet, detect_side=side))
            speeds[f"{PATHS[2][0]}, detect_side {side}"] = run(f"  same, detect_side {side}", crop_fn(cfg), blobs,
                                                               limits.max_pixels)  # fmt: skip
    base = speeds.get(PATHS[0][0])
    for name, (ips, _) in speeds.items():
        if base and name != PATHS[0][0]:
            print(f"  speed ratio {name} / {PATHS[0][0]} = {ips / base[0]:.2f}x")
    if PATHS[2][0] in speeds:
        ips, kept = speeds[PATHS[2][0]]
        verdict = "met" if ips >= 40 and kept >= 0.96 else "NOT met"
        print(f"issue 28's target (yunet + align >= 40 photos/s per core at >= 0.96 kept): {verdict}")
    if args.no_baseline:
        return
    cfg = FaceConfig.from_params(detection).haar  # with crop.policy
    ours, ours_rate = run(f"haar pass only ({cfg.policy})", lambda rgb: detect_face(rgb, cfg).chosen is not None, blobs)
    other = "single" if cfg.policy == "largest" else "largest"
    cfg_other = replace(cfg, policy=other)
    run(f"haar pass only ({other})", lambda rgb: detect_face(rgb, cfg_other).chosen is not None, blobs)
    base, base_rate = run("baseline (report settings + retry)", naive_keep, blobs)
    print(f"speed ratio facesearch/baseline = {ours / base:.1f}x; keep rate {ours_rate:.3f} vs {base_rate:.3f}")


if __name__ == "__main__":
    main()
