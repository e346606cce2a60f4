"""The CelebA file layout on disk, read defensively.

A CelebA-layout folder holds ``img_celeba/`` (in-the-wild photos) or
``img_align_celeba/`` (aligned crops) plus ``identity_CelebA.txt`` (required),
``list_attr_celeba.txt`` and ``list_eval_partition.txt`` (both optional).
Real downloads are often partial: rows name images that are absent, images
lack rows, the attribute file may be truncated (its header count then lies),
lines end in CRLF and columns are separated by runs of spaces. Every reader
here skips a malformed row and counts it instead of failing, so one bad line
never costs a whole run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

IDENTITY_FILE = "identity_CelebA.txt"
ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIRS = ("img_celeba", "img_align_celeba")

# The official 40 attribute names, in the order of list_attr_celeba.txt.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


class DatasetError(Exception):
    """The data folder cannot be used at all (as opposed to one bad file or row)."""


@dataclass
class AnnotationReport:
    """What the annotation readers skipped or found inconsistent."""

    malformed_rows: dict[str, int] = field(default_factory=dict)
    duplicate_rows: dict[str, int] = field(default_factory=dict)
    missing_files: list[str] = field(default_factory=list)
    attribute_header_count: int | None = None
    attribute_rows: int = 0


def find_image_dir(root: str | os.PathLike) -> Path:
    """Return the image folder of a CelebA-layout ``root`` (``img_celeba`` preferred)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root} has no image folder: expected one of {', '.join(IMAGE_DIRS)}")


def list_images(image_dir: str | os.PathLike) -> list[str]:
    """Every regular, non-hidden file in ``image_dir``, sorted by name.

    Non-image files are listed too: the crop stage rejects them with a reason so
    the manifest accounts for every input.
    """
    return sorted(entry.name for entry in os.scandir(image_dir) if entry.is_file() and not entry.name.startswith("."))


def _lines(path: Path) -> list[str]:
    # errors="replace": a stray non-UTF-8 byte must spoil one row, not the file.
    with open(path, encoding="utf-8", errors="replace", newline=None) as fh:
        return fh.read().splitlines()


def read_identities(path: str | os.PathLike, report: AnnotationReport) -> dict[str, int]:
    """Parse ``identity_CelebA.txt`` (``000001.jpg 2880`` per line) into {file name: identity}."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the identity file is required")
    out: dict[str, int] = {}
    bad = dup = 0
    for line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            bad += 1
            continue
        if parts[0] in out:
            dup += 1  # first row wins: a later conflicting row is more likely the damaged one
            continue
        out[parts[0]] = int(parts[1])
    report.malformed_rows[IDENTITY_FILE] = bad
    report.duplicate_rows[IDENTITY_FILE] = dup
    return out


def read_attributes(path: str | os.PathLike, report: AnnotationReport) -> pd.DataFrame:
    """Parse ``list_attr_celeba.txt`` into a boolean frame indexed by file name.

    Line 1 is the row count, line 2 the attribute names, then ``name v1 .. v40``
    with values ``1``/``-1``. A truncated file (fewer rows than its header says,
    a last line cut mid-row) yields the complete rows only. A missing file
    yields an empty frame: attributes are optional.
    """
    path = Path(path)
    empty = pd.DataFrame(columns=list(ATTRIBUTE_NAMES), dtype="boolean")
    empty.index.name = "file_name"
    if not path.is_file():
        report.missing_files.append(ATTRIBUTE_FILE)
        return empty
    lines = _lines(path)
    bad = dup = 0
    header_count = None
    if lines and lines[0].strip().isdigit():
        header_count = int(lines[0].strip())
        lines = lines[1:]
    names = tuple(lines[0].split()) if lines else ()
    if names != ATTRIBUTE_NAMES:
        # Without the official header we cannot know which column is which.
        report.malformed_rows[ATTRIBUTE_FILE] = len(lines)
        report.attribute_header_count = header_count
        return empty
    rows: dict[str, list[bool]] = {}
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        values = parts[1:]
        if len(values) != len(ATTRIBUTE_NAMES) or any(v not in ("1", "-1") for v in values):
            bad += 1
            continue
        if parts[0] in rows:
            dup += 1
            continue
        rows[parts[0]] = [v == "1" for v in values]
    report.malformed_rows[ATTRIBUTE_FILE] = bad
    report.duplicate_rows[ATTRIBUTE_FILE] = dup
    report.attribute_header_count = header_count
    report.attribute_rows = len(rows)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(ATTRIBUTE_NAMES))
    frame = frame.astype("boolean")
    frame.index.name = "file_name"
    return frame if len(frame) else empty


def read_partitions(path: str | os.PathLike, report: AnnotationReport) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` (0 train, 1 val, 2 test); missing file -> {}."""
    path = Path(path)
    if not path.is_file():
        report.missing_files.append(PARTITION_FILE)
        return {}
    out: dict[str, int] = {}
    bad = 0
    for line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            bad += 1
            continue
        out.setdefault(parts[0], int(parts[1]))
    report.malformed_rows[PARTITION_FILE] = bad
    return out


@dataclass
class Annotations:
    identities: dict[str, int]
    attributes: pd.DataFrame
    partitions: dict[str, int]
    report: AnnotationReport


def read_annotations(root: str | os.PathLike) -> Annotations:
    """Read all three annotation files of a CelebA-layout folder."""
    root = Path(root)
    report = AnnotationReport()
    return Annotations(
        identities=read_identities(root / IDENTITY_FILE, report),
        attributes=read_attributes(root / ATTRIBUTE_FILE, report),
        partitions=read_partitions(root / PARTITION_FILE, report),
        report=report,
    )
