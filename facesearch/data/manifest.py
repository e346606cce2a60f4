"""Schema of the image manifest and the split tables, and their one validator each.

Every Parquet write of these tables goes through :func:`validate_manifest` or
:func:`validate_split` first, and the tests call them too, so a schema drift
fails loudly at the stage that caused it instead of three stages later.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

import pandas as pd

from facesearch.data import celeba
from facesearch.data.celeba import ATTRIBUTE_NAMES


class Status(StrEnum):
    KEPT = "kept"
    REJECTED = "rejected"


class Reason(StrEnum):
    """Why an input image was not kept. Stored as plain strings in Parquet.

    In the order the crop stage checks them: the folder entry (never opened when it
    fails), the annotations, the file's bytes, the decoded image, the detection.
    """

    # -- the folder entry, from its name and lstat/stat alone (facesearch.data.celeba.list_entries)
    # Directory, FIFO, socket, device, dangling or looping symlink (a symlink to a file is followed).
    NOT_A_FILE = celeba.NOT_A_FILE
    HIDDEN_FILE = celeba.HIDDEN_FILE  # name starts with "."
    BAD_FILE_NAME = celeba.BAD_FILE_NAME  # not UTF-8 or whitespace/control/backslash in it (file_name is then escaped)
    # Folder layout: directly in the root, or (photo index) deeper than <root>/<person>/; facesearch.data.layouts
    NOT_IN_A_PERSON_FOLDER = "not_in_a_person_folder"
    # -- the annotations
    NO_IDENTITY = "no_identity"  # no row in identity_CelebA.txt (CelebA layout)
    AMBIGUOUS_IDENTITY = "ambiguous_identity"  # identity_CelebA.txt names it twice with different ids
    # -- the bytes
    FILE_TOO_LARGE = "file_too_large"  # more bytes than crop.max_file_bytes (checked by stat; never read)
    EMPTY_FILE = "empty_file"  # zero bytes
    UNREADABLE = "unreadable"  # the file system refused to open or read it
    NOT_AN_IMAGE = "not_an_image"  # no image format recognised
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image format we do not accept
    TOO_LARGE = "too_large"  # more pixels than crop.max_pixels (decompression bomb guard), or out of memory decoding
    TRUNCATED = "truncated"  # the pixel data ends early
    CORRUPT = "corrupt"  # the decoder failed or warned (bad JPEG scan data, bad EXIF/TIFF tags, ...)
    # -- the decoded image
    TOO_SMALL = "too_small"  # smaller than crop.min_image_side
    BAD_ASPECT = "bad_aspect"  # longer side more than crop.max_aspect times the shorter (strips, banners)
    # -- the detection
    NO_FACE = "no_face"  # no detection after the retry
    MULTIPLE_FACES = "multiple_faces"  # several detections after the retry (policy "single")
    # -- anything else
    ERROR = "error"  # an unexpected exception while processing this one photo (logged with the file name)


# --- manifest columns -------------------------------------------------------
IMAGE_PATH = "image_path"  # relative to the data root, e.g. img_celeba/000001.jpg or Ada_Lovelace/1.jpg
FILE_NAME = "file_name"  # CelebA key, e.g. 000001.jpg; folder layout: the image_path, e.g. Ada_Lovelace/1.jpg
# CelebA identity id, or (folder layout) the person folder's number: the sorted folder names are 1..N.
# Null when the image has no identity row or no usable person folder.
IDENTITY = "identity"
PERSON = "person"  # folder layout: the person folder's name; null for CelebA (its identities are unnamed)
PARTITION = "partition"  # list_eval_partition value 0/1/2; null when absent
STATUS = "status"  # Status
REASON = "reject_reason"  # Reason; null when kept
SOURCE_MODE = "source_mode"  # PIL mode of the decoded file (RGB, L, CMYK, I;16, ...)
WIDTH = "width"  # decoded image size in pixels, after EXIF orientation
HEIGHT = "height"
N_FACES = "n_faces"  # detections in the final detection pass; null if never detected
DETECTOR = "detector"  # which detector produced the kept box (haar_frontal, haar_profile, dlib_hog, yunet, ...)
BBOX_X = "bbox_x"  # kept face box in source-image pixels (before margin; may reach past the photo's edge)
BBOX_Y = "bbox_y"
BBOX_W = "bbox_w"
BBOX_H = "bbox_h"
SCORE = "face_score"  # the kept face's detection score, 0..1 (yunet); null for detectors without one (haar, dlib_hog)
# The kept face's 5 landmarks, in this order, as detectors that locate them give them (OpenCV's YuNet:
# the person's right eye, on the image's left in a frontal photo, first). Each backbone's chip is cut
# from the box and these (stages/chips.py); null for detectors without landmarks, and when rejected.
LANDMARKS = ("right_eye", "left_eye", "nose_tip", "right_mouth", "left_mouth")
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{point}_{axis}" for point in LANDMARKS for axis in "xy")  # source pixels
CROP_PATH = "crop_path"  # repo-relative path of the written crop; null when rejected
SHA256 = "sha256"  # content hash of the input file bytes

MANIFEST_DTYPES: dict[str, str] = {
    IMAGE_PATH: "string",
    FILE_NAME: "string",
    IDENTITY: "Int64",
    PERSON: "string",
    PARTITION: "Int8",
    STATUS: "string",
    REASON: "string",
    SOURCE_MODE: "string",
    WIDTH: "Int32",
    HEIGHT: "Int32",
    N_FACES: "Int16",
    DETECTOR: "string",
    BBOX_X: "Int32",
    BBOX_Y: "Int32",
    BBOX_W: "Int32",
    BBOX_H: "Int32",
    SCORE: "Float32",
    **{name: "Float32" for name in LANDMARK_COLUMNS},
    CROP_PATH: "string",
    SHA256: "string",
    **{name: "boolean" for name in ATTRIBUTE_NAMES},
}
MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_DTYPES)

# --- triplet columns ----------------------------------------------------------
# The two states the embed stage exports per backbone (data/embeddings/<b>/<state>_{query,gallery}.npy):
# the untrained twin, then the trained model. Every table, file list and choice uses this order.
STATES = ("before", "after")
STATE_LABELS = {"before": "before fine-tuning", "after": "fine-tuned"}
# What "before" is, by the weights training started from (train.<backbone>.weights): said wherever a
# state is named, because a network with random weights embeds any two faces alike (cosine ~1 on the
# sample) and reads as a broken model unless it says it is none (issue 26).
START_LABELS = {"none": "untrained (random weights)", "imagenet": "ImageNet weights, not fine-tuned",
                "dlib": "dlib's face network, not fine-tuned"}  # fmt: skip


def state_label(state: str, weights: str | None = None) -> str:
    """A model state in words: "fine-tuned", or the starting network named by its ``weights``."""
    if state == "before" and weights in START_LABELS:
        return START_LABELS[weights]
    return STATE_LABELS[state]


ANCHOR = "anchor"  # crop paths
POSITIVE = "positive"
NEGATIVE = "negative"
ANCHOR_IDENTITY = "anchor_identity"
NEGATIVE_IDENTITY = "negative_identity"
TRIPLET_DTYPES: dict[str, str] = {
    ANCHOR: "string",
    POSITIVE: "string",
    NEGATIVE: "string",
    ANCHOR_IDENTITY: "Int64",
    NEGATIVE_IDENTITY: "Int64",
}
TRIPLET_COLUMNS: tuple[str, ...] = tuple(TRIPLET_DTYPES)


class SchemaError(ValueError):
    """A table does not match its schema; the message says which rule failed."""


def conform(df: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    """Return ``df`` with exactly the schema's columns, in order, cast to their dtypes."""
    missing = [c for c in dtypes if c not in df.columns]
    if missing:
        raise SchemaError(f"missing columns: {missing}")
    return df.loc[:, list(dtypes)].astype(dtypes).reset_index(drop=True)


def _check_columns(df: pd.DataFrame, dtypes: dict[str, str], name: str) -> None:
    if tuple(df.columns) != tuple(dtypes):
        extra = [c for c in df.columns if c not in dtypes]
        missing = [c for c in dtypes if c not in df.columns]
        raise SchemaError(f"{name}: columns differ (missing {missing}, unexpected {extra}, or order)")
    for col, dtype in dtypes.items():
        if str(df[col].dtype) != str(pd.api.types.pandas_dtype(dtype)):
            raise SchemaError(f"{name}: column {col!r} has dtype {df[col].dtype}, expected {dtype}")


def _check_paths_exist(paths: pd.Series, base_dir: str | os.PathLike, name: str) -> None:
    base = Path(base_dir)
    missing = [p for p in paths.dropna().unique() if not (base / p).is_file()]
    if missing:
        raise SchemaError(f"{name}: {len(missing)} paths do not exist, e.g. {missing[:3]}")


def validate_manifest(df: pd.DataFrame, base_dir: str | os.PathLike | None = None) -> None:
    """Check the manifest schema and its row invariants.

    ``base_dir``: when given, every ``crop_path`` must exist relative to it
    (the repository root for a stage's output).
    """
    _check_columns(df, MANIFEST_DTYPES, "manifest")
    if df[IMAGE_PATH].isna().any() or df[IMAGE_PATH].duplicated().any():
        raise SchemaError("manifest: image_path must be present and unique")
    if not df[IMAGE_PATH].is_monotonic_increasing:
        raise SchemaError("manifest: rows must be sorted by image_path (reproducible bytes)")
    statuses = set(df[STATUS].dropna().unique())
    if df[STATUS].isna().any() or not statuses <= {s.value for s in Status}:
        raise SchemaError(f"manifest: status must be one of {[s.value for s in Status]}")
    kept = df[STATUS] == Status.KEPT
    rejected = ~kept
    need_for_kept = [IDENTITY, CROP_PATH, DETECTOR, BBOX_X, BBOX_Y, BBOX_W, BBOX_H, WIDTH, HEIGHT]
    for col in need_for_kept:
        if df.loc[kept, col].isna().any():
            raise SchemaError(f"manifest: kept rows must have {col}")
    if df.loc[kept, REASON].notna().any():
        raise SchemaError("manifest: kept rows must not have a reject reason")
    if df.loc[rejected, CROP_PATH].notna().any():
        raise SchemaError("manifest: rejected rows must not have a crop")
    _check_landmarks(df, kept)
    shared = df.loc[kept, CROP_PATH]
    if shared.duplicated().any():
        # Two photos written to one crop file: one overwrote the other, and if they are
        # of different identities the surviving crop carries a wrong label.
        raise SchemaError(f"manifest: kept rows share a crop_path, e.g. {shared[shared.duplicated()].iloc[0]!r}")
    reasons = df.loc[rejected, REASON]
    if reasons.isna().any():
        raise SchemaError("manifest: every rejected row needs a reject_reason")
    unknown = set(reasons.unique()) - {r.value for r in Reason}
    if unknown:
        raise SchemaError(f"manifest: unknown reject reasons {sorted(unknown)}")
    if (df.loc[kept, BBOX_W] <= 0).any() or (df.loc[kept, BBOX_H] <= 0).any():
        raise SchemaError("manifest: kept boxes must have positive size")
    named = df.loc[df[PERSON].notna(), [PERSON, IDENTITY]]
    if named[IDENTITY].isna().any():
        raise SchemaError("manifest: a named person must have an identity")
    if (named.groupby(PERSON)[IDENTITY].nunique() > 1).any() or (named.groupby(IDENTITY)[PERSON].nunique() > 1).any():
        raise SchemaError("manifest: person and identity must match one to one")
    if base_dir is not None:
        _check_paths_exist(df.loc[kept, CROP_PATH], base_dir, "manifest")


def _check_landmarks(df: pd.DataFrame, kept: pd.Series) -> None:
    """A kept face has all 5 landmarks or none (its detector gives none); a rejected row has neither
    landmarks nor a score; every kept face of one run has them or none does (one detector); scores in 0..1."""
    present = df[list(LANDMARK_COLUMNS)].notna()
    some, every = present.any(axis=1), present.all(axis=1)
    if (some & ~every).any():
        raise SchemaError("manifest: a face has some of its landmark columns but not all")
    if (some | df[SCORE].notna())[~kept].any():
        raise SchemaError("manifest: rejected rows must not have landmarks or a face score")
    if every[kept].nunique() > 1:
        raise SchemaError("manifest: some kept faces have landmarks and others not (two detectors); re-run crop whole")
    scores = df[SCORE].dropna()
    if ((scores < 0) | (scores > 1)).any():
        raise SchemaError("manifest: face_score must be in 0..1")


def validate_split(
    train: pd.DataFrame,
    query: pd.DataFrame,
    gallery: pd.DataFrame,
    triplets: pd.DataFrame,
    val: pd.DataFrame | None = None,
    base_dir: str | os.PathLike | None = None,
) -> None:
    """Check the split tables against each other.

    Train, val, query and gallery are manifest-shaped (kept rows only). Rules:
    train, val and test (query + gallery) identities are pairwise disjoint, so
    validation (and the best epoch chosen on it) never sees a test identity and
    never scores a person the model trained on; every val identity has at least
    two images (leave-one-out retrieval needs a match); exactly one query per
    test identity; every query identity has at least one gallery image; no image
    is both query and gallery; triplets use train crops only, anchor and
    positive of one identity (different images), negative of another. With
    ``base_dir``, every crop path must exist.
    """
    val = val if val is not None else train.iloc[:0]
    tables = (("train", train), ("val", val), ("query", query), ("gallery", gallery))
    for name, df in tables:
        _check_columns(df, MANIFEST_DTYPES, name)
        if (df[STATUS] != Status.KEPT).any():
            raise SchemaError(f"{name}: only kept images may enter a split")
        if df[CROP_PATH].duplicated().any():
            raise SchemaError(f"{name}: duplicate images")
    _check_columns(triplets, TRIPLET_DTYPES, "triplets")

    train_ids, val_ids = set(train[IDENTITY]), set(val[IDENTITY])
    test_ids = set(query[IDENTITY]) | set(gallery[IDENTITY])
    for (a, a_ids), (b, b_ids) in (
        (("train", train_ids), ("test", test_ids)), (("val", val_ids), ("train", train_ids)),
        (("val", val_ids), ("test", test_ids)),
    ):  # fmt: skip
        if a_ids & b_ids:
            raise SchemaError(f"split: {len(a_ids & b_ids)} identities in both {a} and {b}")
    if (val[IDENTITY].value_counts() < 2).any():
        raise SchemaError("split: a val identity has a single image (nothing to retrieve)")
    if query[IDENTITY].duplicated().any():
        raise SchemaError("split: more than one query for an identity")
    if not set(query[IDENTITY]) <= set(gallery[IDENTITY]):
        raise SchemaError("split: a query identity has no gallery image")
    if set(gallery[IDENTITY]) - set(query[IDENTITY]):
        raise SchemaError("split: a gallery identity has no query")
    if set(query[CROP_PATH]) & set(gallery[CROP_PATH]):
        raise SchemaError("split: an image is both query and gallery")

    train_paths = set(train[CROP_PATH])
    for col in (ANCHOR, POSITIVE, NEGATIVE):
        if not set(triplets[col]) <= train_paths:
            raise SchemaError(f"triplets: {col} images must come from train")
    if (triplets[ANCHOR] == triplets[POSITIVE]).any():
        raise SchemaError("triplets: anchor and positive must be different images")
    if (triplets[ANCHOR_IDENTITY] == triplets[NEGATIVE_IDENTITY]).any():
        raise SchemaError("triplets: negative must be of another identity")
    path_identity = dict(zip(train[CROP_PATH], train[IDENTITY], strict=True))
    for col, id_col in ((ANCHOR, ANCHOR_IDENTITY), (POSITIVE, ANCHOR_IDENTITY), (NEGATIVE, NEGATIVE_IDENTITY)):
        if (triplets[col].map(path_identity).astype("Int64") != triplets[id_col]).any():
            raise SchemaError(f"triplets: {col} identity does not match the manifest")
    if base_dir is not None:
        for name, df in tables:
            _check_paths_exist(df[CROP_PATH], base_dir, name)
