"""Stage ``chips@<backbone>``: cut one backbone's chips of every split from the source photos.

    python -m stages.chips --backbone resnet50 --data data/sample --split data/split --out data/arrays/resnet50

Row ``i`` of ``<out>/<name>.npy`` is the chip of row ``i`` of ``<split>/<name>.parquet`` for train,
val, query and gallery, with ``<out>/<name>.json`` saying how it was cut (facesearch.faces.chips).
Training, embedding and evaluation memory-map these arrays.

Each backbone cuts its own chip from the one detection the crop stage recorded per photo (its box
and, from a detector that locates them, its 5 landmarks: the manifest's columns, carried by the
split tables), as ``params.yaml: chips.<backbone>`` says (:func:`facesearch.faces.config.chip_config`),
and stores it at ``train.<backbone>.img_size`` (never upscaled). So backbones with different inputs
(square crops, dlib's chip, the ArcFace template) coexist in one ``dvc repro``, and adding one to
``backbones`` adds its branch without re-running another's.

The photos are re-read from ``--data`` (``params.yaml: data.root``) through the crop stage's guards
(``crop.max_file_bytes``, ``crop.max_pixels``, ...) and must still have the bytes the manifest hashed; a
chip that cannot be cut stays a black row, counted by reason in the ``.json`` (facesearch.faces.chips),
and the run goes on. Photos are cut by ``execution.n_jobs`` local joblib workers: how fast, not what,
so dvc.yaml does not list it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from facesearch.faces.chips import cut_chips, faces_of
from facesearch.faces.config import chip_config
from facesearch.faces.cropping import CropLimits
from facesearch.params import load_params

log = logging.getLogger(__name__)

PACKED = ("train", "val", "query", "gallery")


def chip_settings(params: dict, backbone: str):
    """(chip config, stored side) of ``backbone``, or SystemExit saying which params.yaml block is missing."""
    if backbone not in (params.get("train") or {}):
        raise SystemExit(f"chips: backbone {backbone} has no params.yaml train block")
    try:
        cfg = chip_config(params, backbone)
    except ValueError as exc:
        raise SystemExit(f"chips: {exc}") from None
    return cfg, int(params["train"][backbone]["img_size"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--data", required=True, help="the photo folder the crop stage read (params.yaml: data.root)")
    parser.add_argument("--split", required=True, help="folder with the split .parquet files")
    parser.add_argument("--out", required=True, help="folder for this backbone's .npy arrays")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    params = load_params(args.params)
    cfg, img_size = chip_settings(params, args.backbone)
    limits = CropLimits.from_params(params["crop"])
    n_jobs = (params.get("execution") or {}).get("n_jobs", 1)  # as the crop stage
    for name in PACKED:
        table = pd.read_parquet(Path(args.split) / f"{name}.parquet")
        out = Path(args.out) / f"{name}.npy"
        info = cut_chips(faces_of(table, args.data), out, cfg, img_size, limits, n_jobs=n_jobs, desc=name)
        log.info("%s@%s: %d chips (%s, %d px) at %d px, %d failed", name, args.backbone, info["rows"], cfg.align,
                 cfg.size, info["side"], len(info["failed_rows"]))  # fmt: skip


if __name__ == "__main__":
    main()
