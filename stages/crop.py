"""Stage ``crop``: detect one face per photo, record it, crop it for people to see, and write the manifest.

    python -m stages.crop --data data/sample --crops data/crops \
        --manifest data/manifest.parquet --metrics metrics/crop.json --details metrics/details/crop.json \
        --sheet reports/crops.png --timing reports/crop_timing.json --source data/source.json

Reads ``params.yaml: data.root`` (passed as ``--data``), ``data.layout`` (CelebA or
one folder per person, or ``auto``: see facesearch.data.layouts) and ``crop``. Every
entry of the image folder (under the folder layout: every entry under the root)
gets one manifest row: kept with its face's box (and, from a detector that locates them,
its 5 landmarks and score) and a square crop of it, or rejected with a reason
(non-regular files, hidden files and bad names included, never opened). The detection is
the one every backbone's input is cut from (``stages/chips.py``, each backbone its own way:
``chips.<backbone>``); the crops in ``--crops`` (``crop.size``, ``crop.margin``) are for
people: the contact sheet and the app's result pictures.
Photos are processed in parallel with joblib (``execution.n_jobs`` workers on
the ``execution.backend`` backend, on the cluster at ``execution.address`` for
dask/ray: how the stage runs, not what it produces, so no stage lists them in
dvc.yaml); each worker writes its crops into a temporary folder that replaces
``--crops`` only when the whole run succeeded. ``--details`` holds only results
that compare across runs (every reject reason, the annotation problems found), ``--metrics``
their headline (:data:`HEADLINE`: the one row ``dvc metrics show`` prints for this stage);
speed goes to the log and ``--timing`` (not a DVC output: it differs on every run). ``--source``
says where the identities come from (:func:`facesearch.data.layouts.dataset_source`:
the layout, the CelebA identity file's fingerprint, whether the photos are the
synthetic sample's), for the model files trained on them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed, effective_n_jobs, parallel_config
from joblib.parallel import get_active_backend
from PIL import Image
from tqdm import tqdm

from facesearch.data import manifest as M
from facesearch.data.celeba import ATTRIBUTE_NAMES, Annotations, Entry
from facesearch.data.images import decode_image
from facesearch.data.layouts import Dataset, dataset_source, read_dataset
from facesearch.faces.config import display_config
from facesearch.faces.cropping import CropLimits, check_format, crop_names, pre_reason, process_image, read_photo
from facesearch.io import atomic_dir, atomic_path, write_json_atomic, write_parquet_atomic
from facesearch.params import load_params
from facesearch.viz import grid, tile

log = logging.getLogger("facesearch.crop")

# Which photos the contact sheet shows. A constant, not a param: the sheet is a stage output,
# so what it shows must follow from the stage's inputs and params alone (an execution knob
# would change the plot without DVC re-running anything).
SHEET_SEED = 0
EXECUTION_DEFAULTS = {"n_jobs": 1, "backend": "loky", "address": None}
# Reasons decided before a file is opened: such originals are never read for the sheet either.
UNOPENED = {M.Reason.NOT_A_FILE, M.Reason.HIDDEN_FILE, M.Reason.BAD_FILE_NAME, M.Reason.FILE_TOO_LARGE}


def build_manifest(
    entries: list[Entry],
    rows: list[dict],
    annotations: Annotations,
    crop_paths: dict[str, str],
) -> pd.DataFrame:
    """Join per-entry results with the annotations into the schema'd, sorted manifest."""
    records = []
    for entry, row in zip(entries, rows, strict=True):
        name = entry.name
        rec = dict(row)
        rec[M.FILE_NAME] = name
        rec[M.IMAGE_PATH] = entry.image_path
        rec[M.IDENTITY] = annotations.identities.get(name)
        rec[M.PERSON] = entry.person
        rec[M.PARTITION] = annotations.partitions.get(name)
        rec[M.CROP_PATH] = crop_paths[name] if rec[M.STATUS] == M.Status.KEPT else None
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=[c for c in M.MANIFEST_COLUMNS if c not in ATTRIBUTE_NAMES])
    attrs = annotations.attributes.reindex(df[M.FILE_NAME])
    df = pd.concat([df.reset_index(drop=True), attrs.reset_index(drop=True)], axis=1)
    return M.conform(df.sort_values(M.IMAGE_PATH, kind="stable"), M.MANIFEST_DTYPES)


def crop_timing(n_input: int, seconds: float, n_jobs: int, backend: str) -> dict:
    """Speed of this run: depends on the machine and ``execution``, so it is kept out of the metrics."""
    return {
        "n_input": n_input,
        "seconds": round(seconds, 2),
        "images_per_second": round(n_input / seconds, 2) if seconds > 0 else 0.0,
        "images_per_second_per_job": round(n_input / seconds / max(1, n_jobs), 2) if seconds > 0 else 0.0,
        "n_jobs": n_jobs,
        "backend": backend,
    }


# The crop metrics `dvc metrics show` prints: how many photos came in and the share kept (the
# reasons for the rest are in the details).
HEADLINE = ("n_input", "keep_rate")


def crop_metrics(df: pd.DataFrame, dataset: Dataset) -> dict:
    """Results only (a function of data and params): same inputs, same bytes, so runs compare cleanly."""
    n_input = len(df)
    kept = int((df[M.STATUS] == M.Status.KEPT).sum())
    present = set(df[M.FILE_NAME])
    annotations = dataset.annotations
    report = annotations.report
    has_attrs = df[list(ATTRIBUTE_NAMES)].notna().all(axis=1)
    return {
        "layout": dataset.layout,
        "n_input": n_input,
        "n_kept": kept,
        "keep_rate": round(kept / n_input, 4) if n_input else 0.0,
        "rejected": {r.value: int((df[M.REASON] == r.value).sum()) for r in M.Reason},
        "kept_by_detector": {
            str(k): int(v)
            for k, v in df.loc[df[M.STATUS] == M.Status.KEPT, M.DETECTOR].value_counts().sort_index().items()
        },
        "annotations": {
            "images_without_identity": int(df[M.IDENTITY].isna().sum()),
            "identities_kept": int(df.loc[df[M.STATUS] == M.Status.KEPT, M.IDENTITY].nunique()),
            "identity_rows_without_image": len(set(annotations.identities) - present),
            "images_without_attributes": int((~has_attrs).sum()),
            "attribute_rows": report.attribute_rows,
            "attribute_header_count": report.attribute_header_count,
            "malformed_rows": dict(sorted(report.malformed_rows.items())),
            "duplicate_rows": dict(sorted(report.duplicate_rows.items())),
            "conflicting_rows": dict(sorted(report.conflicting_rows.items())),
            "ambiguous_identity_images": int((df[M.REASON] == M.Reason.AMBIGUOUS_IDENTITY).sum()),
            "missing_files": sorted(report.missing_files),
        },
    }


def contact_sheet(
    df: pd.DataFrame,
    data_root: Path,
    limits: CropLimits,
    seed: int = SHEET_SEED,
    n_kept: int = 24,
    n_rejected: int = 12,
    tile_size: int = 128,
) -> np.ndarray:
    """A grid of seeded random kept crops (green) and rejected originals (red, with reason).

    Never raises: a tile that cannot be drawn is left out (with a log warning), and a
    rejected original is shown only when it is a regular file that decodes within
    ``limits``; otherwise its tile is a gray blank with the reason.
    """
    rng = random.Random(seed)
    kept = df[df[M.STATUS] == M.Status.KEPT]
    rejected = df[df[M.STATUS] == M.Status.REJECTED]
    tiles = []
    for _, row in kept.iloc[sorted(rng.sample(range(len(kept)), min(n_kept, len(kept))))].iterrows():
        try:
            img = np.asarray(Image.open(row[M.CROP_PATH]).convert("RGB"))
            label = str(row[M.PERSON]) if pd.notna(row[M.PERSON]) else f"id {row[M.IDENTITY]}"
            tiles.append(tile(img, label, tile_size, (40, 200, 40)))
        except Exception as exc:  # a picture for people: never worth failing the stage
            log.warning("contact sheet: left out %s (%s: %s)", row[M.CROP_PATH], type(exc).__name__, exc)
    for _, row in rejected.iloc[sorted(rng.sample(range(len(rejected)), min(n_rejected, len(rejected))))].iterrows():
        try:
            tiles.append(tile(_original(row, data_root, limits), str(row[M.REASON]), tile_size, (220, 40, 40)))
        except Exception as exc:
            log.warning("contact sheet: left out %s (%s: %s)", row[M.IMAGE_PATH], type(exc).__name__, exc)
    return grid(tiles, cols=8)


def _original(row: pd.Series, data_root: Path, limits: CropLimits) -> np.ndarray | None:
    if row[M.REASON] in UNOPENED:
        return None
    try:
        data = read_photo(data_root / row[M.IMAGE_PATH], limits.max_file_bytes)
        return decode_image(data, limits.max_pixels, strict=False).rgb  # show the damage of a corrupt one
    except Exception:  # rejected for a reason: not being decodable is expected here
        return None


def placeholder_sheet(message: str, size: int = 128) -> np.ndarray:
    return grid([tile(None, message, size, (220, 40, 40))], cols=1)


# Backends that fan the work out over a cluster; ``execution.address`` names the cluster.
CLUSTER_BACKENDS = ("dask", "ray")


@contextlib.contextmanager
def _backend_context(backend: str, n_jobs: int, address: str | None = None) -> Iterator[None]:
    """joblib's ``backend``, connected for ``dask``/``ray`` to the cluster at ``address``.

    No ``address``: the framework's own variable (DASK_SCHEDULER_ADDRESS, RAY_ADDRESS), else
    a local cluster of ``n_jobs`` worker processes that lives as long as the run. A cluster
    the stage only connects to is left running; a local one it started is shut down.
    """
    if backend == "dask":
        # The client is handed over explicitly: joblib would otherwise take whichever client
        # was made last in this process. Its workers set the parallelism, not n_jobs.
        with _dask_client(n_jobs, address) as client, parallel_config(backend="dask", client=client):
            yield
    elif backend == "ray":
        import ray  # optional dependency: requirements-cluster.txt
        from ray.util.joblib import register_ray

        register_ray()
        started = not ray.is_initialized()
        if started and address:
            ray.init(address=address)  # else joblib's ray pool reads RAY_ADDRESS or starts a local ray
        try:
            with parallel_config(backend="ray", n_jobs=n_jobs):
                yield
        finally:
            if started and ray.is_initialized():
                ray.shutdown()  # disconnects from a remote cluster; stops a local one
    else:
        with parallel_config(backend=backend, n_jobs=n_jobs):
            yield


@contextlib.contextmanager
def _dask_client(n_jobs: int, address: str | None) -> Iterator:
    import dask  # optional dependency: requirements-cluster.txt
    from dask.distributed import Client, LocalCluster

    address = address or dask.config.get("scheduler-address", None)  # DASK_SCHEDULER_ADDRESS
    if address:
        with Client(address, set_as_default=False) as client:
            yield client
    else:
        # Processes with one thread each, as loky: the detector is not thread-parallel.
        with (
            LocalCluster(n_workers=effective_n_jobs(n_jobs), threads_per_worker=1, processes=True) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            yield client


MOVED_TO_EXECUTION = ("n_jobs", "backend", "sheet_seed")


def load_crop_params(path: str) -> dict:
    """``params.yaml: crop`` plus ``face`` (its FaceConfig) and ``limits`` (its CropLimits)."""
    p = dict(load_params(path)["crop"])
    moved = [k for k in MOVED_TO_EXECUTION if k in p]
    if moved:
        raise ValueError(f"params.yaml crop.{moved[0]} is gone: n_jobs and backend live under execution: "
                         "(they do not change the outputs), and the contact sheet uses a fixed seed")  # fmt: skip
    p["face"] = display_config(p)
    p["limits"] = CropLimits.from_params(p)
    check_format(p["format"])
    return p


def load_execution(path: str) -> dict:
    """``params.yaml: execution`` (how to run, not what to produce); defaults where absent."""
    given = dict(load_params(path).get("execution") or {})
    unknown = set(given) - set(EXECUTION_DEFAULTS)
    if unknown:
        raise ValueError(f"params.yaml execution: unknown keys {sorted(unknown)}")
    execution = {**EXECUTION_DEFAULTS, **given}
    if execution["address"] and execution["backend"] not in CLUSTER_BACKENDS:
        raise ValueError(f"params.yaml execution.address is for the {' / '.join(CLUSTER_BACKENDS)} backends, "
                         f"not {execution['backend']!r}")  # fmt: skip
    return execution


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="labelled data folder (params: data.root, data.layout)")
    parser.add_argument("--crops", required=True, help="folder for the face crops (replaced whole)")
    parser.add_argument("--manifest", required=True, help="Parquet manifest to write")
    parser.add_argument("--metrics", required=True, help="JSON of the headline metrics to write (DVC metrics)")
    parser.add_argument("--details", required=True, help="JSON of every metric to write (a plain output)")
    parser.add_argument("--sheet", required=True, help="contact sheet PNG to write")
    parser.add_argument("--timing", default=None, help="JSON with this run's speed (not a metric), optional")
    parser.add_argument("--source", default=None, help="JSON of where the identities come from (layout, identity "
                        "file fingerprint, synthetic or real), which train records in the model; optional")  # fmt: skip
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    p = load_crop_params(args.params)
    execution = load_execution(args.params)
    cfg, limits = p["face"], p["limits"]
    data_root = Path(args.data)
    # Fails early (nothing written) if unusable. Entry paths are absolute for the workers: a
    # reused loky worker (or a Dask/Ray one) has its own working directory.
    dataset = read_dataset(data_root, load_params(args.params)["data"]["layout"])
    annotations, entries = dataset.annotations, dataset.entries
    file_names = [e.name for e in entries]
    names = crop_names(file_names, fmt=p["format"])
    crop_paths = {n: (Path(args.crops) / names[n]).as_posix() for n in file_names}
    # Entries rejected before opening (not a file, hidden, bad name, no or ambiguous
    # identity row) are never read; only the rest is decoded and detected.
    early = {e.name: pre_reason(e, annotations) for e in entries}
    todo = [e for e in entries if early[e.name] is None]
    log.info("%s layout: %d entries in %s, %d to process", dataset.layout, len(entries),
             data_root / dataset.image_dir, len(todo))  # fmt: skip

    start = time.perf_counter()
    with atomic_dir(args.crops) as tmp:
        with _backend_context(execution["backend"], execution["n_jobs"], execution["address"]):
            # Results as they come (the progress bar moves) where the backend can; ray's and
            # multiprocessing's pools hand back the whole list at the end.
            streams = get_active_backend()[0].supports_return_generator
            results = Parallel(return_as="generator" if streams else "list")(
                delayed(process_image)(
                    os.fsdecode(e.path),
                    os.path.abspath(tmp / names[e.name]),
                    cfg,
                    p["jpeg_quality"],
                    limits.max_pixels,
                    limits.min_image_side,
                    max_file_bytes=limits.max_file_bytes,
                    max_aspect=limits.max_aspect,
                    fmt=p["format"],
                )
                for e in todo
            )
            done = dict(zip([e.name for e in todo], tqdm(results, total=len(todo), desc="crop", unit="img"),
                            strict=True))  # fmt: skip
        seconds = time.perf_counter() - start
        rows = [done.get(n) or {M.STATUS: M.Status.REJECTED.value, M.REASON: early[n]} for n in file_names]
        errors = [n for n, r in done.items() if r.get(M.REASON) == M.Reason.ERROR]
        if errors:
            # Counted, not fatal; but many of them usually mean a broken setup, not bad photos.
            log.warning("%d of %d photos failed unexpectedly (reject reason error), e.g. %s",
                        len(errors), len(todo), errors[:3])  # fmt: skip
        df = build_manifest(entries, rows, annotations, crop_paths)
        # Check everything before the new crops replace the old ones.
        M.validate_manifest(df)
        lost = [n for n, r in done.items() if r[M.STATUS] == M.Status.KEPT and not (tmp / names[n]).is_file()]
        if lost:
            raise RuntimeError(f"{len(lost)} crops were not written, e.g. {lost[:3]}")
    M.validate_manifest(df, base_dir=".")
    write_parquet_atomic(args.manifest, df)
    metrics = crop_metrics(df, dataset)
    write_json_atomic(args.details, metrics)
    write_json_atomic(args.metrics, {k: metrics[k] for k in HEADLINE})
    if args.source:
        write_json_atomic(args.source, dataset_source(data_root, dataset.layout))
    timing = crop_timing(len(df), seconds, execution["n_jobs"], execution["backend"])
    if args.timing:
        write_json_atomic(args.timing, timing)
    try:
        sheet = contact_sheet(df, data_root, limits)
    except Exception as exc:  # the manifest is written; a picture must not fail the stage
        log.warning("contact sheet failed (%s: %s); writing a placeholder", type(exc).__name__, exc)
        sheet = placeholder_sheet("contact sheet failed")
    with atomic_path(args.sheet) as tmp_png:
        Image.fromarray(sheet).save(tmp_png, format="PNG")
    log.info(
        "kept %d of %d (%.1f%%) in %.1f s (%.1f images/s, %s x%d); rejected: %s",
        metrics["n_kept"],
        metrics["n_input"],
        100 * metrics["keep_rate"],
        timing["seconds"],
        timing["images_per_second"],
        execution["backend"],
        execution["n_jobs"],
        {k: v for k, v in metrics["rejected"].items() if v},
    )


if __name__ == "__main__":
    main()
