"""Stage ``pack``: decode every crop of each split once into a uint8 ``.npy`` array.

    python -m stages.pack --split data/split --out data/arrays

Row ``i`` of ``<out>/<name>.npy`` is the crop of row ``i`` of
``<split>/<name>.parquet`` for train, val, query and gallery, with
``<out>/<name>.json`` saying how it was packed (facesearch.data.packing). Training
and embedding export memory-map these arrays instead of decoding JPEGs.

Images are stored at the side they are used: the largest ``img_size`` of the
``params.yaml: backbones`` (``train.<backbone>.img_size``), downscaled from the
crops with the filter the model input path uses, never upscaled (crops smaller
than that are kept as they are). At 64 px a CelebA array takes 11x less disk
than at the 218 px crop size. Crops are decoded by ``execution.n_jobs`` local
joblib workers (-1: one per core): how fast, not what, so the bytes are the same
for any count and dvc.yaml does not list it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from facesearch.data import manifest as M
from facesearch.data.packing import pack_crops
from facesearch.params import load_params

log = logging.getLogger("facesearch.pack")

PACKED = ("train", "val", "query", "gallery")


def pack_size(params: dict) -> int:
    """The largest input side the listed backbones read: ``max(train.<b>.img_size for b in backbones)``."""
    backbones = params["backbones"]
    missing = [b for b in backbones if b not in params["train"]]
    if not backbones or missing:
        raise SystemExit(f"pack: backbones {missing or '[]'} have no params.yaml train block")
    return max(int(params["train"][b]["img_size"]) for b in backbones)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="folder with the split .parquet files")
    parser.add_argument("--out", required=True, help="folder for the .npy arrays")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    params = load_params(args.params)
    side = pack_size(params)
    n_jobs = (params.get("execution") or {}).get("n_jobs", 1)  # as the crop stage
    for name in PACKED:
        table = pd.read_parquet(Path(args.split) / f"{name}.parquet")
        out = Path(args.out) / f"{name}.npy"
        n = pack_crops(list(table[M.CROP_PATH]), out, side=side, n_jobs=n_jobs, desc=name)
        log.info("%s: %d crops at most %d px", name, n, side)


if __name__ == "__main__":
    main()
