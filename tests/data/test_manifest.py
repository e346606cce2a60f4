from __future__ import annotations

import pandas as pd
import pytest
from conftest import fake_manifest

from facesearch.data import manifest as M


@pytest.fixture
def manifest() -> pd.DataFrame:
    return fake_manifest({1: 2, 2: 3})


def test_valid_manifest_passes(manifest):
    M.validate_manifest(manifest)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=[M.SHA256]), "columns differ"),
        (lambda df: df.assign(**{M.WIDTH: df[M.WIDTH].astype("float64")}), "dtype"),
        (lambda df: df.iloc[::-1].reset_index(drop=True), "sorted"),
        (lambda df: pd.concat([df, df.iloc[[0]]]).sort_values(M.IMAGE_PATH).reset_index(drop=True), "unique"),
        (lambda df: df.assign(**{M.STATUS: "maybe"}), "status"),
        (lambda df: df.assign(**{M.CROP_PATH: pd.array([None] * len(df), dtype="string")}), "kept rows must have"),
        (lambda df: df.assign(**{M.REASON: pd.array(["no_face"] * len(df), dtype="string")}), "must not have a reject"),
        (lambda df: df.assign(**{M.REASON: pd.array(["bad luck"] * len(df), dtype="string")}), "reject"),
    ],
)
def test_validator_catches(manifest, mutate, message):
    with pytest.raises(M.SchemaError, match=message):
        M.validate_manifest(mutate(manifest))


def test_rejected_row_needs_reason(manifest):
    df = manifest.copy()
    df.loc[df[M.STATUS] == "rejected", M.REASON] = None
    with pytest.raises(M.SchemaError, match="needs a reject_reason"):
        M.validate_manifest(df)


def test_missing_crop_files_are_caught(manifest, tmp_path):
    with pytest.raises(M.SchemaError, match="paths do not exist"):
        M.validate_manifest(manifest, base_dir=tmp_path)


def test_two_kept_rows_cannot_share_a_crop(manifest):
    df = manifest.copy()
    kept = df.index[df[M.STATUS] == "kept"]
    df.loc[kept[1], M.CROP_PATH] = df.loc[kept[0], M.CROP_PATH]
    with pytest.raises(M.SchemaError, match="share a crop_path"):
        M.validate_manifest(df)


def test_file_names_must_be_storable(manifest):
    # A raw os.fsdecode of a non-UTF-8 name (lone surrogate) cannot even enter the string column:
    # names go through celeba.storable_name, whose output always can.
    from facesearch.data.celeba import storable_name

    df = manifest.copy()
    with pytest.raises(UnicodeEncodeError):
        df.loc[df.index[-1], M.FILE_NAME] = "bad\udcff.jpg"
    df.loc[df.index[-1], M.FILE_NAME] = storable_name(b"bad\xff.jpg")
    M.validate_manifest(df)


def test_every_reason_is_documented():
    import inspect

    source = inspect.getsource(M.Reason)
    for reason in M.Reason:
        line = next(x for x in source.splitlines() if f"{reason.name} = " in x)
        before = source.split(line)[0].splitlines()[-1]
        assert "#" in line or before.strip().startswith("#"), reason


def named(df: pd.DataFrame, people: list[str | None]) -> pd.DataFrame:
    return df.assign(**{M.PERSON: pd.array(people, dtype="string")})


def test_person_and_identity_match_one_to_one(manifest):
    ids = manifest[M.IDENTITY].tolist()  # 1, 1, 2, 2, 2, then the rejected row's
    good = [None if pd.isna(i) else f"p{i}" for i in ids]
    M.validate_manifest(named(manifest, good))
    M.validate_manifest(named(manifest, [None] * len(ids)))  # CelebA: nobody named
    with pytest.raises(M.SchemaError, match="one to one"):
        M.validate_manifest(named(manifest, ["p1", "p1", "p2", "p2", "p3", *good[5:]]))  # one id, two names
    with pytest.raises(M.SchemaError, match="one to one"):
        M.validate_manifest(named(manifest, ["p1", "p1", "p1", "p1", "p1", *good[5:]]))  # one name, two ids
    with pytest.raises(M.SchemaError, match="must have an identity"):
        M.validate_manifest(named(manifest, [*good[:5], "p9"]))


def with_landmarks(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as a yunet run writes it: every kept face with its score and 5 points."""
    df = df.copy()
    kept = df[M.STATUS] == "kept"
    for k, col in enumerate(M.LANDMARK_COLUMNS):
        df.loc[kept, col] = 20.0 + k
    df.loc[kept, M.SCORE] = 0.95
    return M.conform(df, M.MANIFEST_DTYPES)


def test_landmarks_all_or_none(manifest):
    M.validate_manifest(with_landmarks(manifest))
    some = with_landmarks(manifest)
    some.loc[some.index[0], M.LANDMARK_COLUMNS[3]] = None
    with pytest.raises(M.SchemaError, match="some of its landmark columns"):
        M.validate_manifest(some)
    mixed = with_landmarks(manifest)
    mixed.loc[mixed.index[0], list(M.LANDMARK_COLUMNS)] = None
    with pytest.raises(M.SchemaError, match="two detectors"):
        M.validate_manifest(mixed)
    rejected = with_landmarks(manifest)
    rejected.loc[rejected[M.STATUS] == "rejected", M.SCORE] = 0.5
    with pytest.raises(M.SchemaError, match="rejected rows must not have landmarks"):
        M.validate_manifest(rejected)
    bad = with_landmarks(manifest)
    bad.loc[bad.index[0], M.SCORE] = 1.5
    with pytest.raises(M.SchemaError, match="face_score"):
        M.validate_manifest(bad)


def test_a_state_says_what_it_is():
    # The network training started from is named by its weights: random ones are no model (issue 26).
    assert M.state_label("before", "none") == "untrained (random weights)"
    assert M.state_label("before", "imagenet") == "ImageNet weights, not fine-tuned"
    assert M.state_label("before") == M.STATE_LABELS["before"]  # weights unknown: the generic name
    assert M.state_label("after", "none") == "fine-tuned"
