"""The CelebA file layout on disk, read defensively.

A CelebA-layout folder holds ``img_celeba/`` (in-the-wild photos) or
``img_align_celeba/`` (aligned crops) plus ``identity_CelebA.txt`` (required),
``list_attr_celeba.txt`` and ``list_eval_partition.txt`` (both optional).
Real downloads are often partial: rows name images that are absent, images
lack rows, the attribute file may be truncated (its header count then lies),
lines end in CRLF, files start with a UTF-8 byte-order mark and columns are
separated by runs of spaces. Every reader here skips a malformed row and
counts it instead of failing, so one bad line never costs a whole run. Ids are
ASCII digits only (``str.isdigit`` also accepts ``²`` and ``٣``) and must fit
the manifest's Int64. A file name listed twice with *different* values is
ambiguous: neither row is trusted (no first-wins guess), the name is reported,
and for identities the image is rejected as ``ambiguous_identity``.

The image folder is listed without opening anything (``os.scandir`` entry
types and ``lstat``/``stat`` only), so a FIFO cannot block the listing; every
entry is returned, each usable one or with the reason it cannot be used.
"""

from __future__ import annotations

import os
import re
import stat
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


# Why a folder entry is not even opened. The manifest's Reason enum lists these
# same values (it imports them from here: manifest imports celeba, not the reverse).
NOT_A_FILE = "not_a_file"  # directory, FIFO, socket, device, dangling or looping symlink
HIDDEN_FILE = "hidden_file"  # name starts with "." (.DS_Store, editor swap files)
BAD_FILE_NAME = "bad_file_name"  # not UTF-8, or whitespace/control/backslash: no annotation row can name it

MAX_ID = 2**63 - 1  # identities are Int64 in the manifest
_ASCII_INT = re.compile(r"[0-9]+")
# Whitespace separates the columns of the annotation files, so a name holding it can never
# be keyed there; a backslash is the escape character of storable_name.
_BAD_NAME_CHARS = re.compile(r"[\s\\\x00-\x1f\x7f]")
# Without annotation files (the folder layout) whitespace is fine ("Ada Lovelace/1.jpg"); control
# characters (C0, C1, line separators) are not: they break logs and tables.
_BAD_PATH_CHARS = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def storable_name(raw: bytes) -> str:
    """A file name as a valid, reversible UTF-8 string (Parquet/Arrow reject lone surrogates).

    Valid UTF-8 passes through, except that ``\\`` becomes ``\\\\``; every byte that is not
    part of valid UTF-8 becomes ``\\xNN``. The output parses uniquely back into bytes
    (:func:`raw_name`), so two different names never share a stored name.
    """
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def raw_name(name: str) -> bytes:
    """The inverse of :func:`storable_name`."""
    out = bytearray()
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "\\" and name[i + 1 : i + 2] == "\\":
            out += b"\\"
            i += 2
        elif ch == "\\" and name[i + 1 : i + 2] == "x":
            out.append(int(name[i + 2 : i + 4], 16))
            i += 4
        else:
            out += ch.encode("utf-8")
            i += 1
    return bytes(out)


@dataclass(frozen=True)
class Entry:
    """One entry of the image folder."""

    name: str  # the manifest's file_name: storable_name of the entry's name (its path under the folder layout)
    path: bytes  # the path to open (bytes: works whatever the name's encoding)
    problem: str | None  # None (a regular file, or a symlink to one) or a manifest reject reason
    detail: str = ""  # what kind of entry, for check-data and logs
    image_path: str = ""  # the manifest's image_path: "/"-separated, relative to the data root
    person: str | None = None  # the person folder's name (folder layout); None for CelebA


def _entry_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "regular file")):  # fmt: skip
        if test(mode):
            return kind
    return "special file"


def file_type_problem(path: bytes | str) -> tuple[str | None, str]:
    """(NOT_A_FILE, what it is) unless ``path`` is a regular file or a symlink resolving to one.

    Symlinks are followed to a regular file wherever it lives (data folders are often
    farms of links into a read-only download); a dangling or looping link, or one to
    anything else, is not a file. Only ``lstat``/``stat``: nothing is opened.
    """
    try:
        lmode = os.lstat(path).st_mode
    except OSError as exc:
        return NOT_A_FILE, f"cannot lstat: {exc.strerror}"
    if stat.S_ISREG(lmode):
        return None, ""
    if not stat.S_ISLNK(lmode):
        return NOT_A_FILE, _entry_kind(lmode)
    try:
        mode = os.stat(path).st_mode  # follows the link; ELOOP / ENOENT for loops and dangling links
    except OSError as exc:
        return NOT_A_FILE, f"symlink that does not resolve ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None, ""
    return NOT_A_FILE, f"symlink to a {_entry_kind(mode)}"


def name_problem(raw: bytes, annotated: bool = True) -> str | None:
    """BAD_FILE_NAME, HIDDEN_FILE or None for an entry's name (bytes, as the file system has it).

    ``annotated``: the name must be keyable in an annotation file (no whitespace either).
    Either way a usable name is its own :func:`storable_name`, so a stored path opens the file.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BAD_FILE_NAME
    if (_BAD_NAME_CHARS if annotated else _BAD_PATH_CHARS).search(text):
        return BAD_FILE_NAME
    if text.startswith("."):
        return HIDDEN_FILE
    return None


def list_entries(image_dir: str | os.PathLike) -> list[Entry]:
    """Every entry of ``image_dir``, sorted by stored name, each usable or with its problem.

    ``image_path`` is ``<image_dir's name>/<name>``: relative to the CelebA root.
    """
    base = os.fsencode(image_dir)
    prefix = Path(image_dir).name
    out = []
    with os.scandir(base) as it:
        for de in it:
            raw = de.name
            path = os.path.join(base, raw)
            problem, detail = name_problem(raw), ""
            if problem is None:
                problem, detail = file_type_problem(path)
            elif problem == BAD_FILE_NAME:
                detail = "name is not UTF-8 or holds whitespace, control characters or a backslash"
            name = storable_name(raw)
            out.append(Entry(name, path, problem, detail, image_path=f"{prefix}/{name}"))
    return sorted(out, key=lambda e: e.name)


class DatasetError(Exception):
    """The data folder cannot be used at all (as opposed to one bad file or row)."""


@dataclass
class AnnotationReport:
    """What the annotation readers skipped or found inconsistent."""

    malformed_rows: dict[str, int] = field(default_factory=dict)
    duplicate_rows: dict[str, int] = field(default_factory=dict)  # repeats of an identical row (harmless)
    conflicting_rows: dict[str, int] = field(default_factory=dict)  # names listed with different values
    ambiguous_identities: set[str] = field(default_factory=set)  # names with conflicting identity rows
    missing_files: list[str] = field(default_factory=list)
    attribute_header_count: int | None = None
    attribute_rows: int = 0


def is_celeba(root: str | os.PathLike) -> bool:
    """Whether ``root`` looks like the CelebA layout: its image folder or its identity file is there.

    Either alone is enough, so a download missing the other fails as CelebA with the reason
    (rather than its img_celeba/ passing for one person's folder).
    """
    root = Path(root)
    return (root / IDENTITY_FILE).is_file() or any((root / name).is_dir() for name in IMAGE_DIRS)


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
    """The names of the usable entries of ``image_dir`` (see :func:`list_entries`), sorted.

    Non-image files are listed too: the crop stage rejects them with a reason so
    the manifest accounts for every input.
    """
    return [e.name for e in list_entries(image_dir) if e.problem is None]


def _lines(path: Path) -> list[str]:
    # utf-8-sig: a byte-order mark would otherwise glue itself to the first row's name.
    # errors="replace": a stray non-UTF-8 byte must spoil one row, not the file.
    with open(path, encoding="utf-8-sig", errors="replace", newline=None) as fh:
        return fh.read().splitlines()


def parse_id(text: str) -> int | None:
    """An ASCII decimal id that fits Int64, else None."""
    if not _ASCII_INT.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _dedupe(pairs: list[tuple[str, object]], name: str, report: AnnotationReport) -> tuple[dict, set[str]]:
    """{key: value} of ``pairs``; identical repeats are counted, conflicting keys dropped and returned."""
    out: dict = {}
    conflicting: set[str] = set()
    dup = 0
    for key, value in pairs:
        if key not in out:
            out[key] = value
        elif out[key] == value:
            dup += 1
        else:
            conflicting.add(key)
    for key in conflicting:
        del out[key]
    report.duplicate_rows[name] = dup
    report.conflicting_rows[name] = len(conflicting)
    return out, conflicting


def read_identities(path: str | os.PathLike, report: AnnotationReport) -> dict[str, int]:
    """Parse ``identity_CelebA.txt`` (``000001.jpg 2880`` per line) into {file name: identity}."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the identity file is required")
    pairs = []
    bad = 0
    for line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        ident = parse_id(parts[1]) if len(parts) == 2 else None
        if ident is None:
            bad += 1
            continue
        pairs.append((parts[0], ident))
    report.malformed_rows[IDENTITY_FILE] = bad
    # Conflicting rows: no way to know which is right, and a wrong identity is a label
    # leak into the split; the image is rejected as ambiguous instead of guessed.
    out, conflicting = _dedupe(pairs, IDENTITY_FILE, report)
    report.ambiguous_identities |= conflicting
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
    bad = 0
    header_count = None
    if lines and parse_id(lines[0].strip()) is not None:
        header_count = parse_id(lines[0].strip())
        lines = lines[1:]
    names = tuple(lines[0].split()) if lines else ()
    if names != ATTRIBUTE_NAMES:
        # Without the official header we cannot know which column is which.
        report.malformed_rows[ATTRIBUTE_FILE] = len(lines)
        report.attribute_header_count = header_count
        return empty
    pairs = []
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        values = parts[1:]
        if len(values) != len(ATTRIBUTE_NAMES) or any(v not in ("1", "-1") for v in values):
            bad += 1
            continue
        pairs.append((parts[0], tuple(v == "1" for v in values)))
    report.malformed_rows[ATTRIBUTE_FILE] = bad
    rows, _ = _dedupe(pairs, ATTRIBUTE_FILE, report)  # conflicting names get no attributes (null)
    report.attribute_header_count = header_count
    report.attribute_rows = len(rows)
    frame = pd.DataFrame.from_dict({k: list(v) for k, v in rows.items()}, orient="index", columns=list(ATTRIBUTE_NAMES))
    frame = frame.astype("boolean")
    frame.index.name = "file_name"
    return frame if len(frame) else empty


def read_partitions(path: str | os.PathLike, report: AnnotationReport) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` (0 train, 1 val, 2 test); missing file -> {}."""
    path = Path(path)
    if not path.is_file():
        report.missing_files.append(PARTITION_FILE)
        return {}
    pairs = []
    bad = 0
    for line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            bad += 1
            continue
        pairs.append((parts[0], int(parts[1])))
    report.malformed_rows[PARTITION_FILE] = bad
    out, _ = _dedupe(pairs, PARTITION_FILE, report)  # conflicting names get no partition (null)
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
