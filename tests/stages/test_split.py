from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fake_manifest, run_crop, write_params

from facesearch import manifest as M
from stages import split

PARAMS = {
    "seed": 0, "test_fraction": 0.2, "min_images": 2, "triplets_per_identity": 5, "use_partition": False,
    "val_identities": 0, "val_images": 2,
}  # fmt: skip


def check(tables):
    M.validate_split(tables["train"], tables["query"], tables["gallery"], tables["triplets"], tables["val"])


def test_split_properties():
    counts = {i: 2 + i % 5 for i in range(1, 41)} | {99: 1}  # identity 99 has one image: dropped
    tables = split.make_split(fake_manifest(counts), PARAMS)
    check(tables)
    train_ids, test_ids = set(tables["train"][M.IDENTITY]), set(tables["query"][M.IDENTITY])
    assert not train_ids & test_ids
    assert len(test_ids) == 8 and len(train_ids) == 32 and 99 not in train_ids | test_ids
    assert len(tables["query"]) == 8
    assert len(tables["gallery"]) == sum(counts[i] for i in test_ids) - 8
    assert len(tables["triplets"]) == 32 * 5
    metrics = split.split_metrics(fake_manifest(counts), tables, 2)
    assert metrics["identities_dropped_below_min_images"] == 1 and metrics["queries"] == 8


def test_seed_changes_split_and_same_seed_is_identical():
    df = fake_manifest({i: 4 for i in range(1, 31)})
    a, b = split.make_split(df, PARAMS), split.make_split(df, PARAMS)
    for name in split.SPLIT_FILES:
        pd.testing.assert_frame_equal(a[name], b[name])
    c = split.make_split(df, PARAMS | {"seed": 1})
    assert set(c["query"][M.IDENTITY]) != set(a["query"][M.IDENTITY])


def test_use_partition_honours_celeba_test_partition():
    counts = {i: 3 for i in range(1, 21)}
    partitions = {i: (2 if i <= 5 else 0 if i <= 15 else 1) for i in counts}
    tables = split.make_split(fake_manifest(counts, partitions), PARAMS | {"use_partition": True})
    check(tables)
    assert set(tables["query"][M.IDENTITY]) == {1, 2, 3, 4, 5}


def test_validator_rejects_broken_splits():
    tables = split.make_split(fake_manifest({i: 4 for i in range(1, 21)}), PARAMS)
    leak = tables["query"].iloc[[0]].copy()
    with pytest.raises(M.SchemaError, match="both train and test"):
        M.validate_split(pd.concat([tables["train"], leak], ignore_index=True), tables["query"], tables["gallery"],
                         tables["triplets"])  # fmt: skip
    with pytest.raises(M.SchemaError, match="both query and gallery"):
        M.validate_split(tables["train"], tables["query"], pd.concat([tables["gallery"], leak], ignore_index=True),
                         tables["triplets"])  # fmt: skip
    lonely = tables["gallery"][tables["gallery"][M.IDENTITY] != tables["query"][M.IDENTITY].iloc[0]]
    with pytest.raises(M.SchemaError, match="no gallery image"):
        M.validate_split(tables["train"], tables["query"], lonely.reset_index(drop=True), tables["triplets"])
    bad = tables["triplets"].copy()
    bad.loc[0, M.NEGATIVE_IDENTITY] = bad.loc[0, M.ANCHOR_IDENTITY]
    with pytest.raises(M.SchemaError, match="another identity"):
        M.validate_split(tables["train"], tables["query"], tables["gallery"], bad)
    with pytest.raises(M.SchemaError, match="paths do not exist"):
        M.validate_split(tables["train"], tables["query"], tables["gallery"], tables["triplets"], base_dir="/")


def test_triplet_negatives_cover_other_identities():
    tables = split.make_split(
        fake_manifest({i: 3 for i in range(1, 11)}), PARAMS | {"test_fraction": 0.0, "triplets_per_identity": 200}
    )
    trip = tables["triplets"]
    # Negatives are drawn uniformly over the other identities.
    for _ident, group in trip.groupby(M.ANCHOR_IDENTITY):
        assert group[M.NEGATIVE_IDENTITY].nunique() == 9
    assert np.all(trip[M.ANCHOR] != trip[M.POSITIVE])


def test_stage_writes_validated_byte_identical_tables(small_sample, tmp_path):
    run_crop(tmp_path, small_sample)
    params = write_params(tmp_path / "params.yaml", {"split.test_fraction": 0.34})
    args = ["--manifest", "data/manifest.parquet", "--out", "data/split", "--metrics", "metrics/split.json",
            "--params", str(params)]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        split.main(args)
        first = {n: Path(f"data/split/{n}.parquet").read_bytes() for n in split.SPLIT_FILES}
        split.main(args)
        second = {n: Path(f"data/split/{n}.parquet").read_bytes() for n in split.SPLIT_FILES}
        tables = {n: pd.read_parquet(f"data/split/{n}.parquet") for n in split.SPLIT_FILES}
        M.validate_split(tables["train"], tables["query"], tables["gallery"], tables["triplets"], base_dir=".")
    finally:
        os.chdir(cwd)
    assert first == second
    assert len(tables["query"]) == 2 and len(tables["triplets"]) > 0


def test_val_slice_holds_out_unseen_images_of_train_identities():
    counts = {i: 2 + i % 6 for i in range(1, 41)}
    tables = split.make_split(fake_manifest(counts), PARAMS | {"val_identities": 10, "val_images": 2})
    check(tables)
    val, train = tables["val"], tables["train"]
    assert val[M.IDENTITY].nunique() == 10 and (val.groupby(M.IDENTITY).size() == 2).all()
    assert set(val[M.IDENTITY]) <= set(train[M.IDENTITY])
    assert not set(val[M.CROP_PATH]) & set(train[M.CROP_PATH])
    assert (train.groupby(M.IDENTITY).size() >= 2).all()
    used = set(tables["triplets"][M.ANCHOR]) | set(tables["triplets"][M.POSITIVE]) | set(tables["triplets"][M.NEGATIVE])
    assert not used & set(val[M.CROP_PATH])
    with pytest.raises(M.SchemaError, match="val image is also a train image"):
        M.validate_split(
            train, tables["query"], tables["gallery"], tables["triplets"], pd.concat([val, train.iloc[[0]]])
        )
