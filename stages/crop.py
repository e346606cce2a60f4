"""Stage ``crop``: detect and crop one face per photo, and write the manifest.

    python -m stages.crop --data data/sample --crops data/crops \
        --manifest data/manifest.parquet --metrics metrics/crop.json --sheet reports/crops.png

Reads ``params.yaml: data.root`` (passed as ``--data``) and ``crop``. Every file
in the image folder gets one manifest row: kept with its crop, or rejected with
a reason. Photos are processed in parallel with joblib (``crop.n_jobs``
workers on the ``crop.backend`` backend); each worker writes its crops into a
temporary folder that replaces ``--crops`` only when the whole run succeeded.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed, parallel_config
from PIL import Image
from tqdm import tqdm

from facesearch import manifest as M
from facesearch.celeba import ATTRIBUTE_NAMES, Annotations, find_image_dir, list_images, read_annotations
from facesearch.cropping import crop_names, process_image
from facesearch.faces import FaceConfig
from facesearch.images import ImageRejected, decode_image
from facesearch.io import atomic_dir, atomic_path, write_json_atomic, write_parquet_atomic
from facesearch.params import load_params
from facesearch.viz import grid, tile

log = logging.getLogger("facesearch.crop")


def build_manifest(
    file_names: list[str],
    image_dir_name: str,
    rows: list[dict],
    annotations: Annotations,
    crop_paths: dict[str, str],
) -> pd.DataFrame:
    """Join per-image results with the annotations into the schema'd, sorted manifest."""
    records = []
    for name, row in zip(file_names, rows, strict=True):
        rec = dict(row)
        rec[M.FILE_NAME] = name
        rec[M.IMAGE_PATH] = f"{image_dir_name}/{name}"
        rec[M.IDENTITY] = annotations.identities.get(name)
        rec[M.PARTITION] = annotations.partitions.get(name)
        rec[M.CROP_PATH] = crop_paths[name] if rec[M.STATUS] == M.Status.KEPT else None
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=[c for c in M.MANIFEST_COLUMNS if c not in ATTRIBUTE_NAMES])
    attrs = annotations.attributes.reindex(df[M.FILE_NAME])
    df = pd.concat([df.reset_index(drop=True), attrs.reset_index(drop=True)], axis=1)
    return M.conform(df.sort_values(M.IMAGE_PATH, kind="stable"), M.MANIFEST_DTYPES)


def crop_metrics(df: pd.DataFrame, annotations: Annotations, seconds: float, n_jobs: int) -> dict:
    n_input = len(df)
    kept = int((df[M.STATUS] == M.Status.KEPT).sum())
    present = set(df[M.FILE_NAME])
    report = annotations.report
    has_attrs = df[list(ATTRIBUTE_NAMES)].notna().all(axis=1)
    return {
        "n_input": n_input,
        "n_kept": kept,
        "keep_rate": round(kept / n_input, 4) if n_input else 0.0,
        "seconds": round(seconds, 2),
        "images_per_second": round(n_input / seconds, 2) if seconds > 0 else 0.0,
        "images_per_second_per_job": round(n_input / seconds / n_jobs, 2) if seconds > 0 else 0.0,
        "n_jobs": n_jobs,
        "rejected": {r.value: int((df[M.REASON] == r.value).sum()) for r in M.Reason},
        "kept_by_detector": {
            str(k): int(v)
            for k, v in df.loc[df[M.STATUS] == M.Status.KEPT, M.DETECTOR].value_counts().sort_index().items()
        },
        "annotations": {
            "images_without_identity": int(df[M.IDENTITY].isna().sum()),
            "identity_rows_without_image": len(set(annotations.identities) - present),
            "images_without_attributes": int((~has_attrs).sum()),
            "attribute_rows": report.attribute_rows,
            "attribute_header_count": report.attribute_header_count,
            "malformed_rows": dict(sorted(report.malformed_rows.items())),
            "duplicate_rows": dict(sorted(report.duplicate_rows.items())),
            "missing_files": sorted(report.missing_files),
        },
    }


def contact_sheet(
    df: pd.DataFrame, data_root: Path, seed: int, n_kept: int = 24, n_rejected: int = 12, tile_size: int = 128
) -> np.ndarray:
    """A grid of seeded random kept crops (green) and rejected originals (red, with reason)."""
    rng = random.Random(seed)
    kept = df[df[M.STATUS] == M.Status.KEPT]
    rejected = df[df[M.STATUS] == M.Status.REJECTED]
    tiles = []
    for _, row in kept.iloc[sorted(rng.sample(range(len(kept)), min(n_kept, len(kept))))].iterrows():
        img = np.asarray(Image.open(row[M.CROP_PATH]).convert("RGB"))
        tiles.append(tile(img, f"id {row[M.IDENTITY]}", tile_size, (40, 200, 40)))
    for _, row in rejected.iloc[sorted(rng.sample(range(len(rejected)), min(n_rejected, len(rejected))))].iterrows():
        try:
            img = decode_image((data_root / row[M.IMAGE_PATH]).read_bytes(), 40_000_000).rgb
        except (ImageRejected, OSError):
            img = None
        tiles.append(tile(img, str(row[M.REASON]), tile_size, (220, 40, 40)))
    return grid(tiles, cols=8)


def _backend_context(backend: str, n_jobs: int):
    """joblib backend by name; ``dask``/``ray`` fan the stage out over a cluster when installed."""
    if backend == "ray":
        from ray.util.joblib import register_ray  # optional dependency

        register_ray()
    elif backend == "dask":
        from dask.distributed import Client  # optional dependency; registers the "dask" backend

        # DASK_SCHEDULER_ADDRESS points at a running cluster; unset starts a local one.
        Client(os.environ.get("DASK_SCHEDULER_ADDRESS"))
    return parallel_config(backend=backend, n_jobs=n_jobs)


def load_crop_params(path: str) -> dict:
    p = dict(load_params(path)["crop"])
    p["face"] = FaceConfig.from_params(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CelebA-layout folder (params: data.root)")
    parser.add_argument("--crops", required=True, help="folder for the face crops (replaced whole)")
    parser.add_argument("--manifest", required=True, help="Parquet manifest to write")
    parser.add_argument("--metrics", required=True, help="JSON metrics to write")
    parser.add_argument("--sheet", required=True, help="contact sheet PNG to write")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    p = load_crop_params(args.params)
    cfg = p["face"]
    data_root = Path(args.data)
    image_dir = find_image_dir(data_root)
    annotations = read_annotations(data_root)  # fails early (nothing written) if unusable
    file_names = list_images(image_dir)
    names = crop_names(file_names)
    crop_paths = {n: (Path(args.crops) / names[n]).as_posix() for n in file_names}
    # Images without an identity row cannot enter any split: skip their decoding.
    todo = [n for n in file_names if n in annotations.identities]
    log.info("%d files in %s, %d with an identity row", len(file_names), image_dir, len(todo))

    start = time.perf_counter()
    with atomic_dir(args.crops) as tmp:
        with _backend_context(p["backend"], p["n_jobs"]):
            results = Parallel(return_as="generator")(
                delayed(process_image)(
                    str(image_dir / n),
                    str(tmp / names[n]),
                    cfg,
                    p["jpeg_quality"],
                    p["max_pixels"],
                    p["min_image_side"],
                )
                for n in todo
            )
            done = dict(zip(todo, tqdm(results, total=len(todo), desc="crop", unit="img"), strict=True))
        seconds = time.perf_counter() - start
        no_identity = {M.STATUS: M.Status.REJECTED.value, M.REASON: M.Reason.NO_IDENTITY.value}
        rows = [done.get(n, no_identity) for n in file_names]
        df = build_manifest(file_names, image_dir.name, rows, annotations, crop_paths)
        # Check everything before the new crops replace the old ones.
        M.validate_manifest(df)
        lost = [n for n, r in done.items() if r[M.STATUS] == M.Status.KEPT and not (tmp / names[n]).is_file()]
        if lost:
            raise RuntimeError(f"{len(lost)} crops were not written, e.g. {lost[:3]}")
    M.validate_manifest(df, base_dir=".")
    write_parquet_atomic(args.manifest, df)
    metrics = crop_metrics(df, annotations, seconds, p["n_jobs"])
    write_json_atomic(args.metrics, metrics)
    sheet = contact_sheet(df, data_root, p["sheet_seed"])
    with atomic_path(args.sheet) as tmp_png:
        Image.fromarray(sheet).save(tmp_png, format="PNG")
    log.info(
        "kept %d of %d (%.1f%%) at %.1f images/s; rejected: %s",
        metrics["n_kept"],
        metrics["n_input"],
        100 * metrics["keep_rate"],
        metrics["images_per_second"],
        {k: v for k, v in metrics["rejected"].items() if v},
    )


if __name__ == "__main__":
    main()
