"""How a photo folder is laid out, and who is in each photo: the one home of layout detection and
person naming, for the crop stage, ``evaluate``, ``check-data`` and the photo index.

Labelled layouts (the pipeline needs identities; ``params.yaml: data.layout``, ``evaluate --layout``):

``celeba``
    ``<root>/img_celeba/`` or ``img_align_celeba/`` plus ``identity_CelebA.txt`` (see
    :mod:`facesearch.data.celeba`): identities, attributes and partitions from the annotation files.
``folders``
    One folder per person, ``<root>/<person>/*.jpg|png|...``, as LFW, VGGFace2 and
    CASIA-WebFace ship. The person is the top folder's name, kept in the manifest's ``person``
    column; a person's identity number is a function of the name alone
    (:func:`person_identity`), so the same name is the same number in any folder, and adding or
    removing a person never changes anyone else's. Photos in sub-folders of a person folder
    are that person's: the walk recurses into the person (``<root>/<person>/session2/x.jpg``
    is ``<person>``). No attributes, no partitions. A photo directly in the root is rejected ``not_in_a_person_folder``.
``auto``
    ``celeba`` when the CelebA files are there, else ``folders`` when every photo sits in a
    person folder, else a :class:`~facesearch.data.celeba.DatasetError` naming the layouts.

The unlabelled layout ``plain`` (photos anywhere under the root, nobody named) is for
photo-index galleries only (``index build|add --layout``, :func:`assign_people`).

Listing follows the crop stage's rules: ``lstat``/``stat`` only (nothing is opened, a FIFO
cannot block the walk), symlinked folders are not followed, and every entry is returned
once, usable or with the manifest reject reason it gets: a hidden entry (a hidden person
folder is one entry: its contents are not listed), anything that is not a regular file,
a folder that cannot be listed, and (folder layout) a path with a part that is not UTF-8
or holds control characters or a backslash (a stored path must open its file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from facesearch.data.celeba import (
    ATTRIBUTE_NAMES,
    AnnotationReport,
    Annotations,
    DatasetError,
    Entry,
    file_type_problem,
    find_image_dir,
    is_celeba,
    list_entries,
    name_problem,
    raw_name,
    read_annotations,
    storable_name,
)
from facesearch.data.manifest import Reason

log = logging.getLogger(__name__)

AUTO, CELEBA, FOLDERS, PLAIN = "auto", "celeba", "folders", "plain"
LABELLED_LAYOUTS = (AUTO, CELEBA, FOLDERS)  # data.layout, evaluate/check-data --layout
GALLERY_LAYOUTS = (AUTO, FOLDERS, PLAIN)  # index build|add --layout


# A file the built-in sample generator (facesearch.data.synth) writes at its root: the photos are synthetic.
SAMPLE_MARKER = "facesearch-sample.json"


def person_identity(name: str) -> int:
    """The identity number of the person folder ``name``: 63 bits of its SHA-256, never 0.

    A function of the name alone, so a person keeps their number whatever other folders
    exist (sorted numbering 1..N renumbered everyone after an added folder); 63 bits keep it
    a positive Int64, and two of a million names collide with probability ~1e-7.
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") >> 1 or 1


def is_synthetic(root: str | os.PathLike) -> bool:
    """Whether ``root`` is the built-in synthetic sample (its generator's marker file is there)."""
    return (Path(root) / SAMPLE_MARKER).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_source(root: str | os.PathLike, layout: str) -> dict:
    """Where a labelled folder's identities come from, as a model records it (``identities["source"]``).

    CelebA: the identity file's SHA-256 (a partial download of CelebA shares the official file,
    so its numbers mean the same people); folders: nothing more, a person *is* their folder's
    name there. ``synthetic``: the built-in sample's cartoon faces. ``name``: the folder's name,
    for people to read (never compared).
    """
    root = Path(root)
    out: dict = {"layout": layout, "name": root.resolve().name, "synthetic": is_synthetic(root)}
    if layout == CELEBA:
        from facesearch.data.celeba import IDENTITY_FILE

        out["identity_file_sha256"] = file_sha256(root / IDENTITY_FILE)
    return out


def source_description(source: dict, identities: int, images: int) -> str:
    """E.g. "395 photos of 20 people of celeba-dev (real photos)" for a threshold's record."""
    kind = "the synthetic sample's cartoon faces" if source.get("synthetic") else "real photos"
    return f"{images:,} photos of {identities:,} people of {source.get('name', 'unknown data')} ({kind})"


def same_source(a: dict | None, b: dict | None) -> bool:
    """Whether two :func:`dataset_source` records name people the same way (ids or names mean the same people).

    CelebA: the same identity file; folders: any folder layout (a person is a name). Unknown
    (None, older models): never.
    """
    if not a or not b or a.get("layout") != b.get("layout"):
        return False
    if a["layout"] == CELEBA:
        return a.get("identity_file_sha256") is not None and a.get("identity_file_sha256") == b.get(
            "identity_file_sha256"
        )
    return a["layout"] == FOLDERS


@dataclass(frozen=True)
class PhotoFile:
    rel: str  # relative to the root, "/"-separated storable names
    path: bytes  # what to open
    person: str | None = None


@dataclass(frozen=True)
class Skip:
    photo: str  # as PhotoFile.rel
    reason: str
    detail: str = ""


def list_photo_files(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> tuple[list, list]:
    """(photo files, skips) under ``root``, recursively, sorted by path (part by part).

    Only ``lstat``/``stat`` (nothing is opened, so a FIFO cannot block the walk);
    hidden entries and anything that is not a regular file (or a symlink to one)
    are skips. Symlinked folders are not followed (no loops). ``exclude``: folders
    to leave out (the index itself, when it sits inside the photos).
    """
    base = os.fsencode(os.path.abspath(root))
    if not os.path.isdir(base):
        raise DatasetError(f"photo folder {os.fsdecode(base)} does not exist or is not a folder")
    skipped = {os.fsencode(os.path.abspath(e)) for e in exclude}
    files: list[PhotoFile] = []
    skips: list[Skip] = []

    def walk(folder: bytes, parts: tuple[str, ...]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:  # a folder we may not list: its photos cannot be used, the rest can
            skips.append(Skip("/".join(parts) or ".", Reason.UNREADABLE.value, exc.strerror or str(exc)))
            return
        for entry in entries:
            path = os.path.join(folder, entry.name)
            rel = "/".join((*parts, storable_name(entry.name)))
            if path in skipped:
                continue
            try:
                is_dir = stat.S_ISDIR(os.lstat(path).st_mode)  # a symlink to a folder is not followed
            except OSError as exc:  # gone since the listing
                skips.append(Skip(rel, Reason.NOT_A_FILE.value, exc.strerror or str(exc)))
                continue
            if entry.name.startswith(b"."):
                skips.append(Skip(rel, Reason.HIDDEN_FILE.value))
            elif is_dir:
                walk(path, (*parts, storable_name(entry.name)))
            else:
                problem, detail = file_type_problem(path)
                if problem is None:
                    files.append(PhotoFile(rel, path))
                else:
                    skips.append(Skip(rel, problem, detail))

    walk(base, ())
    files.sort(key=lambda f: f.rel.split("/"))
    return files, skips


def in_person_folder(rel: str, nested: bool) -> bool:
    """Whether the photo at ``rel`` sits in a ``<root>/<person>/`` folder (``nested``: or below it)."""
    depth = rel.count("/")
    return depth >= 1 if nested else depth == 1


def assign_people(files: list[PhotoFile], layout: str, nested: bool = False) -> tuple[list[PhotoFile], list[Skip], str]:
    """Name each photo's person by ``layout``; returns (files, skips, layout used).

    ``folders``: the person is the top folder; ``plain``: nobody; ``auto``: ``folders``
    when every photo sits in a person folder, else ``plain``. ``nested=False`` (the photo
    index, where sub-folders are usually albums, not people) takes only photos exactly one
    folder deep; deeper ones are skipped ``not_in_a_person_folder`` like photos in the root.
    """
    if layout not in GALLERY_LAYOUTS:
        raise DatasetError(f"layout must be one of {GALLERY_LAYOUTS}, not {layout!r}")
    ok = [in_person_folder(f.rel, nested) for f in files]
    if layout == AUTO:
        layout = FOLDERS if files and all(ok) else PLAIN
    if layout == PLAIN:
        return files, [], layout
    named = [PhotoFile(f.rel, f.path, f.rel.split("/")[0]) for f, good in zip(files, ok, strict=True) if good]
    skips = [Skip(f.rel, Reason.NOT_IN_A_PERSON_FOLDER.value) for f, good in zip(files, ok, strict=True) if not good]
    return named, skips, layout


@dataclass(frozen=True)
class Dataset:
    """A labelled data folder, read: what the crop stage, ``evaluate`` and ``check-data`` work from."""

    layout: str  # CELEBA or FOLDERS (never AUTO)
    image_dir: str  # for people: the image folder's name (CelebA) or "." (the root, folder layout)
    entries: list[Entry]  # every entry, sorted by image_path, usable or with its reject reason
    annotations: Annotations  # identities keyed by Entry.name; folder layout: no attributes, partitions


def _path_problem(base: bytes, path: bytes) -> str | None:
    for part in os.path.relpath(path, base).split(b"/"):
        problem = name_problem(part, annotated=False)
        if problem is not None:
            return problem
    return None


def read_folders(root: str | os.PathLike, listing: tuple[list, list] | None = None) -> Dataset:
    """The folder layout of ``root`` (see the module doc); ``listing``: its list_photo_files, if made."""
    files, skips = listing or list_photo_files(root)
    unlisted = [s for s in skips if s.photo == "."]
    if unlisted:
        raise DatasetError(f"data folder {root} cannot be listed: {unlisted[0].detail}")
    base = os.fsencode(os.path.abspath(root))
    entries = [Entry(s.photo, os.path.join(base, raw_name(s.photo)), s.reason, s.detail, image_path=s.photo)
               for s in skips]  # fmt: skip
    for f in files:
        problem = _path_problem(base, f.path)
        detail = "a path part is not UTF-8 or holds control characters or a backslash" if problem else ""
        person = None
        if not in_person_folder(f.rel, nested=True):
            problem, detail = Reason.NOT_IN_A_PERSON_FOLDER.value, "directly in the root"
        elif name_problem(os.path.relpath(f.path, base).split(b"/")[0], annotated=False) is None:
            person = f.rel.split("/")[0]
        entries.append(Entry(f.rel, f.path, problem, detail, image_path=f.rel, person=person))
    entries.sort(key=lambda e: e.image_path)
    numbers = {p: person_identity(p) for p in {e.person for e in entries if e.person is not None}}
    nested = sum(e.person is not None and e.image_path.count("/") > 1 for e in entries)
    if nested:
        log.info("%d photos sit in sub-folders of their person folder: they count as that person's", nested)
    attributes = pd.DataFrame(columns=list(ATTRIBUTE_NAMES), dtype="boolean")
    attributes.index.name = "file_name"
    identities = {e.name: numbers[e.person] for e in entries if e.person is not None}
    return Dataset(FOLDERS, ".", entries, Annotations(identities, attributes, {}, AnnotationReport()))


def read_celeba(root: str | os.PathLike) -> Dataset:
    """The CelebA layout of ``root``; raises DatasetError (before anything is listed) if unusable."""
    image_dir = find_image_dir(root)
    annotations = read_annotations(root)
    # Absolute paths: a reused worker process may sit in another working directory.
    return Dataset(CELEBA, image_dir.name, list_entries(os.path.abspath(image_dir)), annotations)


def check_folders(root: str | os.PathLike, files: list[PhotoFile]) -> None:
    """The ``auto`` rule past CelebA: DatasetError unless every photo sits in a person folder."""
    if files and all(in_person_folder(f.rel, nested=True) for f in files):
        return
    loose = [f.rel for f in files if not in_person_folder(f.rel, nested=True)]
    found = f"{len(loose)} files directly in it, e.g. {loose[:3]}" if loose else "no photos in it"
    raise DatasetError(
        f"{root} is not a labelled layout ({found}). The pipeline needs labelled photos: layout celeba "
        "(img_celeba/ or img_align_celeba/ plus identity_CelebA.txt) or folders (one folder per person, "
        "<root>/<person>/*.jpg; force it with layout folders to reject the loose files). A plain folder of "
        "unlabelled photos is for photo-index galleries (python -m facesearch index build --photos)."
    )


def read_dataset(root: str | os.PathLike, layout: str = AUTO) -> Dataset:
    """Every entry of the labelled data folder ``root`` under ``layout`` (one of LABELLED_LAYOUTS)."""
    if layout not in LABELLED_LAYOUTS:
        raise DatasetError(f"layout must be one of {LABELLED_LAYOUTS}, not {layout!r} (plain folders have no "
                           "identities: they are for photo-index galleries)")  # fmt: skip
    if not Path(root).is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    if layout == CELEBA or (layout == AUTO and is_celeba(root)):
        return read_celeba(root)
    listing = list_photo_files(root)
    if layout == AUTO:
        check_folders(root, listing[0])
    return read_folders(root, listing)
