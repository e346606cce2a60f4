"""YuNet's score and NMS thresholds, scored on validation identities only (celeba-dev's non-test people).

    python bench/yunet_thresholds.py --data ../shared/data/celeba-dev [--nms 0.3,0.4,0.5] [--scores 0.5,0.6,0.7,0.8,0.9]

The test identities are those ``stages/split.py`` holds out with ``params.yaml: split`` (the same
seeded draw over every identity); their photos are never read. Each remaining photo is decoded through
the crop stage's guards, YuNet runs once per NMS threshold at the lowest score threshold, and every
higher score threshold is applied afterwards (a face at or above it can only have been suppressed by a
higher-scored one, so filtering after NMS equals detecting at that threshold). ``crop.policy: largest``
then chooses the face, as the crop stage does. For each (score, NMS):

- ``kept``: the share of photos with a face;
- ``loo_rank1``, ``loo_mAP``: leave-one-out over the kept photos of a model none of these people trained:
  OpenCV's SFace (``cv2.FaceRecognizerSF``, the verified zoo file) on the ArcFace chip cut from the
  chosen face's own 5 landmarks (``align: arcface``), plain cosine search, no flip.

- on the photos the strictest score threshold keeps, Rank-1 and mAP with the face this setting chose
  there (a looser threshold can only change the chosen face to a larger false detection: a wrong
  face costs here, and only here, since the photos are the same);
- ``added``: the photos this setting keeps beyond the strictest, and the share of them whose nearest
  other kept photo is of the same person (a real face of that person, or clutter).

The plain LOO over all kept photos also moves with which photos are kept (low-score faces are the
hard ones: profiles, blur), so it is not a score of the threshold alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facesearch.data import manifest as M
from facesearch.data.images import ImageRejected, decode_image
from facesearch.data.layouts import read_dataset
from facesearch.faces import zoo
from facesearch.faces.detection import choose_face
from facesearch.faces.yunet import YuNet, align_face
from facesearch.params import load_params
from facesearch.retrieval.metrics import leave_one_out_metrics
from stages.split import split_identities


def non_test_photos(root: str, split: dict) -> list[tuple[bytes, int]]:
    """(path, identity) of every labelled photo whose identity the split does not hold out for test."""
    data = read_dataset(root)
    ids = data.annotations.identities
    rows = [(e.path, ids[e.name]) for e in data.entries if e.problem is None and e.name in ids]
    images = pd.DataFrame({M.IDENTITY: [i for _, i in rows], M.PARTITION: np.nan})
    _, _, test = split_identities(images, split["test_fraction"], split["val_fraction"],
                                  np.random.default_rng(split["seed"]), False)  # fmt: skip
    return [(p, i) for p, i in rows if i not in set(test)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/celeba-dev")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--nms", default="0.3,0.4,0.5")
    parser.add_argument("--scores", default="0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--detect-side", type=int, default=640)
    parser.add_argument("--n", type=int, default=0, help="first N photos only (0: all)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    params = load_params(args.params)
    photos = non_test_photos(args.data, params["split"])
    if args.n:
        photos = photos[: args.n]
    scores = [float(s) for s in args.scores.split(",")]
    rgbs, labels = [], []
    for path, identity in photos:
        try:
            rgbs.append(decode_image(Path(path.decode()).read_bytes(), params["crop"]["max_pixels"]).rgb)
            labels.append(identity)
        except ImageRejected:
            pass
    labels = np.array(labels)
    print(f"{len(rgbs)} photos of {len(set(labels))} non-test identities")
    rec = cv2.FaceRecognizerSF.create(str(zoo.verified_model_file("sface_int8bq")), "")
    for nms in (float(v) for v in args.nms.split(",")):
        net = YuNet("yunet_int8bq", min(scores), nms, 5000, args.detect_side)
        found = [net.detect(rgb) for rgb in rgbs]
        cache: dict = {}
        chosen = {}
        for t in scores:
            for k, (rgb, faces) in enumerate(zip(rgbs, found, strict=True)):
                keep = [i for i in range(len(faces)) if faces.scores[i] >= t]
                boxes = tuple(tuple(int(v) for v in faces.boxes[i]) for i in keep)
                h, w = rgb.shape[:2]
                det = choose_face(boxes, "yunet", "largest", w, h, tuple(map(tuple, faces.landmarks[keep])))
                if det.chosen is None:
                    continue
                chosen[t, k] = key = (k, det.chosen)
                if key not in cache:
                    chip = align_face(rgb, np.asarray(det.landmarks_of(det.chosen)))
                    cache[key] = unit(rec.feature(cv2.cvtColor(chip, cv2.COLOR_RGB2BGR)).reshape(-1))
        strict = {k for (t, k) in chosen if t == max(scores)}
        for t in scores:
            kept = sorted(k for (s, k) in chosen if s == t)
            emb = np.stack([cache[chosen[t, k]] for k in kept])
            loo = leave_one_out_metrics(emb, labels[kept])
            # The photos every threshold keeps, with the face this one chose: a wrong face costs here.
            common = [k for k in kept if k in strict]
            same = leave_one_out_metrics(np.stack([cache[chosen[t, k]] for k in common]), labels[common])
            # The photos this threshold adds to the strictest's: real faces of the person (Rank-1 high) or clutter.
            added = [i for i, k in enumerate(kept) if k not in strict]
            r1 = added_rank1(emb, labels[kept], added)
            print(
                f"nms {nms:.2f} score {t:.2f}: kept {len(kept) / len(rgbs):.4f} ({len(kept)}/{len(rgbs)})  "
                f"loo_rank1 {loo['rank1']:.4f}  loo_mAP {loo['mAP']:.4f}  | strictest's {len(common)} photos: "
                f"rank1 {same['rank1']:.4f} mAP {same['mAP']:.4f}  | {len(added)} added: rank1 {r1:.3f}",
                flush=True,
            )


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def added_rank1(emb: np.ndarray, labels: np.ndarray, rows: list[int]) -> float:
    """Share of ``rows`` whose nearest other photo is of the same person (nan when none)."""
    if not rows:
        return float("nan")
    sim = emb[rows] @ emb.T
    sim[np.arange(len(rows)), rows] = -np.inf
    return float((labels[sim.argmax(1)] == labels[rows]).mean())


if __name__ == "__main__":
    main()
