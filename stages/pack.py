"""Stage ``pack``: decode every crop of each split once into a uint8 ``.npy`` array.

    python -m stages.pack --split data/split --out data/arrays

Row ``i`` of ``<out>/<name>.npy`` is the crop of row ``i`` of
``<split>/<name>.parquet`` for train, val, query and gallery. Training and
embedding export memory-map these arrays instead of decoding JPEGs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from facesearch import manifest as M
from facesearch.data import pack_crops

log = logging.getLogger("facesearch.pack")

PACKED = ("train", "val", "query", "gallery")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="folder with the split .parquet files")
    parser.add_argument("--out", required=True, help="folder for the .npy arrays")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    for name in PACKED:
        table = pd.read_parquet(Path(args.split) / f"{name}.parquet")
        n = pack_crops(list(table[M.CROP_PATH]), Path(args.out) / f"{name}.npy", desc=name)
        log.info("%s: %d crops", name, n)


if __name__ == "__main__":
    main()
