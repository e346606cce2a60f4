"""Stage ``split``: identity-disjoint train/val/test split, triplets, query and gallery.

    python -m stages.split --manifest data/manifest.parquet --out data/split \
        --metrics metrics/split.json --details metrics/details/split.json

Reads ``params.yaml: split``. Every identity goes to exactly one of train, val
and test. Writes ``train.parquet`` (kept images of train identities),
``val.parquet`` (all kept images of the validation identities: people the model
never trains on, so per-epoch validation and the choice of the best epoch
never look at the test identities), ``triplets.parquet`` (offline triplets
over train), and for the test identities ``query.parquet`` (one seeded image
per identity) and ``gallery.parquet`` (all their other images; the other
identities act as distractors for each query). ``--details`` gets the size of each
part, ``--metrics`` their headline (:data:`HEADLINE`: the one row ``dvc metrics show``
prints for this stage).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from facesearch.data import manifest as M
from facesearch.io import write_json_atomic, write_parquet_atomic
from facesearch.params import load_params
from facesearch.retrieval.protocol import choose_queries, eligible_images

log = logging.getLogger("facesearch.split")
# The split metrics `dvc metrics show` prints: the test protocol every score is measured on (each
# query moves Rank-1 by 1/queries); the other parts' sizes are in the details.
HEADLINE = ("queries", "gallery")

SPLIT_FILES = ("train", "val", "triplets", "query", "gallery")


def split_identities(
    images: pd.DataFrame, test_fraction: float, val_fraction: float, rng: np.random.Generator,
    use_partition: bool,
) -> tuple[list[int], list[int], list[int]]:  # fmt: skip
    """Assign each identity to train, val or test; returns (train, val, test) ids, each sorted.

    ``test_fraction`` and ``val_fraction`` are shares of the identities; at least
    one identity stays in train. With ``use_partition``, identities whose images are
    mostly in one of CelebA's partitions follow it (0 train, 1 val, 2 test: CelebA's
    partitions are identity-disjoint); identities without partition rows are split at
    random by the fractions like the rest.
    """
    ids = sorted(int(i) for i in images[M.IDENTITY].unique())
    fixed: dict[int, int] = {}
    if use_partition:
        part = images.dropna(subset=[M.PARTITION]).groupby(M.IDENTITY)[M.PARTITION]
        fixed = {int(i): int(p.astype(int).mode().max()) for i, p in part}
    free = [i for i in ids if i not in fixed]
    n_test, n_val = _share(len(free), test_fraction), _share(len(free), val_fraction)
    if n_test + n_val > len(free) - 1:  # train keeps one identity; test gives way last
        n_val = max(0, min(n_val, len(free) - 1 - n_test))
        n_test = max(0, min(n_test, len(free) - 1))
    # The test draw comes first, so adding or resizing val leaves the test identities as they were.
    perm = rng.permutation(len(free))
    test = {free[k] for k in perm[:n_test]} | {i for i, p in fixed.items() if p == 2}
    val = {free[k] for k in perm[n_test : n_test + n_val]} | {i for i, p in fixed.items() if p == 1}
    return [i for i in ids if i not in test | val], sorted(val), sorted(test)


def _share(n: int, fraction: float) -> int:
    """``round(n * fraction)``, but at least one when the fraction is positive."""
    return max(round(n * fraction), 1) if fraction > 0 and n > 0 else 0


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
    train_ids, val_ids, test_ids = split_identities(
        images, params["test_fraction"], params["val_fraction"], rng, params["use_partition"]
    )
    train, val, test = (images[images[M.IDENTITY].isin(ids)].reset_index(drop=True)
                        for ids in (train_ids, val_ids, test_ids))  # fmt: skip
    query, gallery = choose_queries(test, rng)
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
        # Validation identities: disjoint from train and test, all their kept images.
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
    parser.add_argument("--out", required=True, help="folder for train/val/triplets/query/gallery .parquet")
    parser.add_argument("--metrics", required=True, help="JSON of the headline metrics to write (DVC metrics)")
    parser.add_argument("--details", required=True, help="JSON of every metric to write (a plain output)")
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
    write_json_atomic(args.details, metrics)
    write_json_atomic(args.metrics, {k: metrics[k] for k in HEADLINE})
    log.info("%s", metrics)


if __name__ == "__main__":
    main()
