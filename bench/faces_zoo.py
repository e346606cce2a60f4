"""YuNet detect + align against Haar and dlib HOG detection, same photos, one core.

    python bench/faces_zoo.py --data ../shared/data/celeba-dev --n 200

Every path decodes the same bytes with the same decoder (``facesearch.data.images.decode_image``)
on one core (``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``), and speed is photos per
second of the process's CPU time, so per core even on a machine shared with other jobs. A
photo is kept when the path finds at least one face (the crop stage's ``policy: largest``
then keeps the largest). Paths:

- Haar: ``facesearch.faces.haar.detect_face`` with ``params.yaml: crop.haar`` (detection only);
- dlib HOG: ``facesearch.faces.dlib_hog.detect_hog`` (``dlib.get_frontal_face_detector()``, with
  ``crop.hog_upsample`` and ``crop.hog_max_side``; detection only);
- YuNet + the ArcFace chip: ``facesearch.faces.yunet.YuNet(...).detect`` then
  ``align_face`` of the best face (112 px), for each installed YuNet file and ``--sides``.

Prints photos/s, keep rate and the speed ratio against Haar measured in the same run; then,
on the YuNet chips, SFace's embedding time per chip (the PyTorch port and OpenCV's
``FaceRecognizerSF.feature``) and the agreement of the int8bq port with the float32 one when
both files are installed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import facesearch  # noqa: F401  (before torch: sets how its threads wait, facesearch/__init__.py)

# isort: split
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from facesearch.data.celeba import find_image_dir, list_images
from facesearch.data.images import ImageRejected, decode_image
from facesearch.faces import zoo
from facesearch.faces.config import FaceConfig
from facesearch.faces.cropping import CropLimits, read_photo
from facesearch.faces.haar import detect_face
from facesearch.params import load_params


def run(name: str, keep_fn, blobs: list[bytes], max_pixels: int) -> tuple[float, float]:
    """Photos per CPU second of this (single-threaded) process, and the keep rate.

    CPU time, not wall time: on a shared machine wall time also counts the other jobs'
    turns on the core, CPU time only this path's work (wall photos/s printed beside it).
    """
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
    print(f"{name:34s} {ips:7.2f} photos/s per core (wall {len(blobs) / wall:6.2f})  keep rate {rate:.3f}", flush=True)
    return ips, rate


def yunet_align(detector, chips: list | None = None):
    """Detect, then cut the best face's 112 px ArcFace chip (collected in ``chips`` when given)."""
    from facesearch.faces.yunet import align_face

    def keep(rgb) -> bool:
        faces = detector.detect(rgb)
        if not len(faces):
            return False
        chip = align_face(rgb, faces.landmarks[0])
        if chips is not None:
            chips.append(chip)
        return True

    return keep


def embedding_speed(chips: np.ndarray) -> None:
    """SFace's CPU milliseconds per chip: the PyTorch port (batch 1 and 32) and OpenCV, per installed file."""
    from facesearch.nets import sface

    ports = {}
    for name in ("sface", "sface_int8bq"):
        if not zoo.available(name):
            print(f"{name}: not installed, skipped")
            continue
        net = ports[name] = sface.pretrained_sface(name)
        x = sface.chips_to_input(chips)
        with torch.inference_mode():
            net(x[:2])  # warm-up: first-call allocations
            start = time.process_time()
            for i in range(len(x)):
                net(x[i : i + 1])
            one = (time.process_time() - start) / len(x)
            start = time.process_time()
            for i in range(0, len(x), 32):
                net(x[i : i + 32])
            batched = (time.process_time() - start) / len(x)
        rec = cv2.FaceRecognizerSF.create(str(zoo.verified_model_file(name)), "")
        bgr = [np.ascontiguousarray(c[..., ::-1]) for c in chips]
        rec.feature(bgr[0])
        start = time.process_time()
        for c in bgr:
            rec.feature(c)
        ocv = (time.process_time() - start) / len(x)
        print(
            f"{name:14s} per chip: torch port {one * 1e3:6.1f} ms (batch 1), {batched * 1e3:6.1f} ms (batch 32); "
            f"OpenCV feature {ocv * 1e3:6.1f} ms"
        )
    if len(ports) == 2:
        with torch.inference_mode():
            a, b = (F.normalize(ports[n](sface.chips_to_input(chips)), dim=1) for n in ("sface", "sface_int8bq"))
        cos = (a * b).sum(1)
        print(f"int8bq vs float32 port, cosine over {len(chips)} chips: min {cos.min():.5f}  mean {cos.mean():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/celeba-dev", help="CelebA-layout folder")
    parser.add_argument("--n", type=int, default=200, help="photos, seeded random sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sides", default="640,480", help="YuNet detect_side values to time (0: full photo)")
    parser.add_argument("--score", type=float, default=0.9, help="YuNet score threshold")
    parser.add_argument("--nms", type=float, default=0.3, help="YuNet NMS IoU threshold")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    image_dir = find_image_dir(args.data)
    names = list_images(image_dir)
    names = sorted(random.Random(args.seed).sample(names, min(args.n, len(names))))
    crop_params = load_params(args.params)["crop"]
    limits = CropLimits.from_params(crop_params)
    blobs = []  # read once: time decode + detect only, as the crop stage reads
    for n in names:
        try:
            blobs.append(read_photo(image_dir / n, limits.max_file_bytes))
        except ImageRejected as exc:
            print(f"skipped {n}: {exc}")
    cfg = FaceConfig.from_params(crop_params)
    print(f"{len(blobs)} photos from {image_dir}, one core, crop.policy {cfg.policy}")
    mp = limits.max_pixels
    haar, _ = run("haar (crop.haar), detect", lambda rgb: detect_face(rgb, cfg.haar).chosen is not None, blobs, mp)
    from facesearch.faces.dlib_hog import detect_hog

    def hog_keep(rgb) -> bool:
        return detect_hog(rgb, cfg.hog_upsample, cfg.policy, cfg.hog_max_side).chosen is not None

    try:
        ips, _ = run(f"dlib hog (upsample {cfg.hog_upsample}), detect", hog_keep, blobs, mp)
        print(f"  speed ratio dlib hog / haar = {ips / haar:.2f}x")
    except RuntimeError as exc:  # dlib not installed: faces.py says which pip install
        print(f"dlib hog skipped: {exc}")

    from facesearch.faces.yunet import YuNet

    chips: list[np.ndarray] = []
    for model in ("yunet_int8bq", "yunet"):
        if not zoo.available(model):
            print(f"{model}: not installed ({zoo.MODELS[model].requirement}), skipped")
            continue
        for side in (int(s) for s in args.sides.split(",")):
            detector = YuNet(model, args.score, args.nms, detect_side=side)
            first = not chips
            ips, _ = run(f"{model} side {side} + align", yunet_align(detector, chips if first else None), blobs, mp)
            print(f"  speed ratio {model} side {side} + align / haar = {ips / haar:.2f}x")
    print("issue 28's target: YuNet detect + align >= 40 photos/s per core at >= 0.96 kept")
    if chips:
        embedding_speed(np.stack(chips))


if __name__ == "__main__":
    main()
