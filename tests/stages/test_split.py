from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fake_manifest, run_crop, write_params

from facesearch.data import manifest as M
from facesearch.retrieval.protocol import eligible_images
from stages import split

PARAMS = {
    "seed": 0, "test_fraction": 0.2, "val_fraction": 0.0, "min_images": 2, "triplets_per_identity": 5,
    "use_partition": False,
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
    assert set(tables["val"][M.IDENTITY]) == set(range(16, 21))  # partition 1 is CelebA's validation


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


@pytest.fixture
def cropped_project(small_sample, tmp_path, monkeypatch):
    """A project folder (the working directory) with the sample cropped; yields split's arguments."""
    run_crop(tmp_path, small_sample)
    params = write_params(tmp_path / "params.yaml", {"split.test_fraction": 0.34})
    monkeypatch.chdir(tmp_path)  # the manifest's crop paths are relative to the project folder
    return ["--manifest", "data/manifest.parquet", "--out", "data/split", "--metrics", "metrics/split.json",
            "--details", "metrics/details/split.json", "--params", str(params)]  # fmt: skip


def read_tables() -> dict[str, bytes]:
    return {n: Path(f"data/split/{n}.parquet").read_bytes() for n in split.SPLIT_FILES}


def test_stage_writes_validated_byte_identical_tables(cropped_project):
    split.main(cropped_project)
    first = read_tables()
    split.main(cropped_project)
    assert first == read_tables()
    tables = {n: pd.read_parquet(f"data/split/{n}.parquet") for n in split.SPLIT_FILES}
    M.validate_split(tables["train"], tables["query"], tables["gallery"], tables["triplets"], base_dir=".")
    assert len(tables["query"]) == 2 and len(tables["triplets"]) > 0
    # Every size in the details; the headline (what `dvc metrics show` prints) is the test protocol's.
    details = json.loads(Path("metrics/details/split.json").read_text())
    assert details["train_images"] == len(tables["train"]) and details["triplets"] == len(tables["triplets"])
    assert json.loads(Path("metrics/split.json").read_text()) == {"queries": 2, "gallery": len(tables["gallery"])}


def test_stage_reads_the_manifest_not_the_crops(cropped_project):
    # Why dvc.yaml's split does not depend on data/crops: other crop pixels, same tables.
    split.main(cropped_project)
    first = read_tables()
    crops = sorted(Path("data/crops").iterdir())
    for crop in crops:
        crop.write_bytes(crops[0].read_bytes() if crop != crops[0] else crops[1].read_bytes())
    split.main(cropped_project)
    assert first == read_tables()
    crops[0].unlink()  # but a missing crop is still refused
    with pytest.raises(M.SchemaError, match="paths do not exist"):
        split.main(cropped_project)


def test_val_identities_are_disjoint_from_train_and_test():
    counts = {i: 2 + i % 6 for i in range(1, 51)}
    manifest = fake_manifest(counts)
    tables = split.make_split(manifest, PARAMS | {"val_fraction": 0.2})
    check(tables)
    train, val = set(tables["train"][M.IDENTITY]), set(tables["val"][M.IDENTITY])
    test = set(tables["query"][M.IDENTITY])
    assert (len(train), len(val), len(test)) == (30, 10, 10)  # the sample's 50 identities at 0.2 / 0.2
    assert not train & val and not val & test and not train & test
    assert len(tables["val"]) == sum(counts[i] for i in val)  # every kept image of a val identity
    used = set(tables["triplets"][M.ANCHOR_IDENTITY]) | set(tables["triplets"][M.NEGATIVE_IDENTITY])
    assert used == train
    # Val is carved after the test draw: the test identities do not depend on val_fraction.
    assert test == set(split.make_split(manifest, PARAMS)["query"][M.IDENTITY])
    metrics = split.split_metrics(manifest, tables, 2)
    assert (metrics["train_identities"], metrics["val_identities"], metrics["test_identities"]) == (30, 10, 10)
    assert metrics["val_images"] == len(tables["val"])


def test_tiny_sets_keep_a_train_identity():
    images = eligible_images(fake_manifest({1: 2, 2: 2}), 2)
    train, val, test = split.split_identities(images, 0.5, 0.5, np.random.default_rng(0), use_partition=False)
    assert len(train) == 1 and len(val) + len(test) == 1


def test_validator_rejects_val_overlaps():
    tables = split.make_split(fake_manifest({i: 4 for i in range(1, 21)}), PARAMS | {"val_fraction": 0.2})
    train, val, query, gallery, triplets = (tables[n] for n in ("train", "val", "query", "gallery", "triplets"))
    with pytest.raises(M.SchemaError, match="both val and train"):
        M.validate_split(train, query, gallery, triplets, pd.concat([val, train.iloc[[0]]], ignore_index=True))
    with pytest.raises(M.SchemaError, match="both val and test"):
        M.validate_split(train, query, gallery, triplets, pd.concat([val, gallery.iloc[[0]]], ignore_index=True))
    lone = val[val[M.IDENTITY] != val[M.IDENTITY].iloc[0]]
    with pytest.raises(M.SchemaError, match="single image"):
        M.validate_split(train, query, gallery, triplets, pd.concat([lone, val.iloc[[0]]], ignore_index=True))
