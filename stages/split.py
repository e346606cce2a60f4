"""Stage ``split``: identity-disjoint train/test split, triplets, query and gallery.

    python -m stages.split --manifest data/manifest.parquet --out data/split \
        --metrics metrics/split.json

Reads ``params.yaml: split``. Writes ``train.parquet`` (kept images of train
identities), ``val.parquet`` (a few held-out images of some train identities:
retrieval among unseen photos of people the model was trained on, for
validation during training), ``triplets.parquet`` (offline triplets over
train), and for the held-out identities ``query.parquet`` (one seeded image per identity) and
``gallery.parquet`` (all their other images; the other identities act as
distractors for each query).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from facesearch import manifest as M
from facesearch.io import write_json_atomic, write_parquet_atomic
from facesearch.params import load_params
from facesearch.protocol import choose_queries, eligible_images

log = logging.getLogger("facesearch.split")

SPLIT_FILES = ("train", "val", "triplets", "query", "gallery")


def split_identities(
    images: pd.DataFrame, test_fraction: float, rng: np.random.Generator, use_partition: bool
) -> tuple[list[int], list[int]]:
    """Assign each identity to train or test; returns (train ids, test ids), sorted.

    With ``use_partition``, identities whose images are mostly in CelebA's test
    partition (2) go to test and those mostly in 0/1 to train; identities
    without partition rows are split at random like the rest.
    """
    ids = sorted(int(i) for i in images[M.IDENTITY].unique())
    fixed: dict[int, bool] = {}
    if use_partition:
        part = images.dropna(subset=[M.PARTITION]).groupby(M.IDENTITY)[M.PARTITION]
        fixed = {int(i): bool((p == 2).mean() > 0.5) for i, p in part}
    free = [i for i in ids if i not in fixed]
    n_test = round(len(free) * test_fraction)
    if free and test_fraction > 0:
        n_test = min(max(n_test, 1), len(free) - 1) if len(free) > 1 else 0
    perm = rng.permutation(len(free))
    test = {free[k] for k in perm[:n_test]} | {i for i, t in fixed.items() if t}
    return [i for i in ids if i not in test], sorted(test)


def hold_out_val(
    train: pd.DataFrame, n_identities: int, n_images: int, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``n_images`` images of up to ``n_identities`` train identities.

    Only identities that keep at least two training images are eligible, so
    every train identity can still form anchor-positive pairs.
    """
    groups = sorted(train.groupby(M.IDENTITY).indices.items())
    eligible = [(i, pos) for i, pos in groups if len(pos) >= n_images + 2]
    chosen = rng.permutation(len(eligible))[: max(0, n_identities)] if n_images > 0 else []
    held = np.zeros(len(train), dtype=bool)
    for k in sorted(chosen):
        positions = eligible[k][1]
        held[rng.choice(positions, size=n_images, replace=False)] = True
    return train[~held].reset_index(drop=True), train[held].reset_index(drop=True)


def make_triplets(train: pd.DataFrame, per_identity: int, rng: np.random.Generator) -> pd.DataFrame:
    """Offline triplets: anchor and positive of one identity, negative of a random other one."""
    paths = train[M.CROP_PATH].to_numpy()
    groups = {int(i): paths[pos] for i, pos in sorted(train.groupby(M.IDENTITY).indices.items())}
    ids = np.array(sorted(groups))
    rows = []
    if len(ids) < 2:
        return M.conform(pd.DataFrame(columns=list(M.TRIPLET_COLUMNS)), M.TRIPLET_DTYPES)
    for k, ident in enumerate(ids):
        own = groups[ident]
        for _ in range(per_identity):
            a, p = rng.choice(len(own), size=2, replace=False)
            other = ids[(k + 1 + rng.integers(len(ids) - 1)) % len(ids)]  # uniform over the others
            neg = groups[int(other)][rng.integers(len(groups[int(other)]))]
            rows.append((own[a], own[p], neg, int(ident), int(other)))
    return M.conform(pd.DataFrame(rows, columns=list(M.TRIPLET_COLUMNS)), M.TRIPLET_DTYPES)


def make_split(manifest: pd.DataFrame, params: dict) -> dict[str, pd.DataFrame]:
    """The whole split as a pure function of the manifest and ``params.yaml: split``."""
    rng = np.random.default_rng(params["seed"])
    images = eligible_images(manifest, params["min_images"])
    train_ids, test_ids = split_identities(images, params["test_fraction"], rng, params["use_partition"])
    train = images[images[M.IDENTITY].isin(train_ids)].reset_index(drop=True)
    test = images[images[M.IDENTITY].isin(test_ids)].reset_index(drop=True)
    query, gallery = choose_queries(test, rng)
    train, val = hold_out_val(train, params["val_identities"], params["val_images"], rng)
    triplets = make_triplets(train, params["triplets_per_identity"], rng)
    return {"train": train, "val": val, "triplets": triplets, "query": query, "gallery": gallery}


def split_metrics(manifest: pd.DataFrame, tables: dict[str, pd.DataFrame], min_images: int) -> dict:
    kept = manifest[manifest[M.STATUS] == M.Status.KEPT]
    used = pd.concat([tables["train"], tables["val"], tables["query"], tables["gallery"]])
    return {
        "identities_kept": int(kept[M.IDENTITY].nunique()),
        "identities_dropped_below_min_images": int(kept[M.IDENTITY].nunique() - used[M.IDENTITY].nunique()),
        "min_images": min_images,
        "train_identities": int(tables["train"][M.IDENTITY].nunique()),
        "train_images": len(tables["train"]),
        "val_identities": int(tables["val"][M.IDENTITY].nunique()),
        "val_images": len(tables["val"]),
        "test_identities": int(tables["query"][M.IDENTITY].nunique()),
        "test_images": len(tables["query"]) + len(tables["gallery"]),
        "triplets": len(tables["triplets"]),
        "queries": len(tables["query"]),
        "gallery": len(tables["gallery"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="folder for train/triplets/query/gallery .parquet")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    params = load_params(args.params)["split"]
    manifest = pd.read_parquet(args.manifest)
    M.validate_manifest(manifest)
    tables = make_split(manifest, params)
    M.validate_split(
        tables["train"], tables["query"], tables["gallery"], tables["triplets"], tables["val"], base_dir="."
    )
    if tables["query"].empty or tables["train"].empty:
        raise SystemExit("split: too few identities with enough kept images for a train and a test set")
    out = Path(args.out)
    for name in SPLIT_FILES:
        write_parquet_atomic(out / f"{name}.parquet", tables[name])
    metrics = split_metrics(manifest, tables, params["min_images"])
    write_json_atomic(args.metrics, metrics)
    log.info("%s", metrics)


if __name__ == "__main__":
    main()
