"""Search your own photos: ``python -m facesearch index build|add|remove|info`` and ``search``.

    python -m facesearch index build --model models/resnet50.pt --photos ~/Pictures --out photos.index
    python -m facesearch index add --index photos.index --photos ~/Pictures/2025 [--prune]
    python -m facesearch index remove --index photos.index --photos ~/Pictures/2025/blurry.jpg
    python -m facesearch index remove --index photos.index --missing
    python -m facesearch index info --index photos.index [--check] [--json]
    python -m facesearch search --index photos.index me.jpg [more.jpg ...] [--top 9] [--also 4] [--json]

``build`` indexes *every* face of every photo under ``--photos`` (recursively,
files in sorted order), found and cut with the model's own preprocessing
(``payload["preprocessing"]``, :func:`facesearch.contract.model_preprocessing`)
and embedded by :mod:`facesearch.photos`, the code the app uses. A file that is
not a usable photo (hidden, not a regular file, not an image, truncated, a
decompression bomb, too small, no face ...) is a counted skip with its reason,
never a crash. Each content (SHA-256 of the file's bytes) is indexed once.

Paths: a photo is its absolute path with the folders resolved (``os.path.realpath``
of the folder given, then the path below it as listed; symlinked folders are not
followed, a symlinked file keeps its own name). Each folder given to build/add is a
*root*, recorded with its layout; a folder given to ``add`` that lies inside an
indexed root is scanned as part of that root, so ``root/alice/x.jpg`` is the same
photo whether added through ``root`` or ``root/alice``.

People: with ``--layout folders`` (one folder per person, ``<photos>/<person>/*.jpg``)
a photo is *of* its folder's person, and the one face that is that person is
indexed under the name (:func:`find_person`); its other faces (bystanders) are
indexed unnamed. ``plain`` names nobody; ``auto`` (the default) is ``folders``
when every photo sits exactly one folder below the root, else ``plain`` (an
``add`` inside an indexed root takes that root's layout). Under ``folders`` a
photo outside a person folder is skipped (``not_in_a_person_folder``). Which face
is the person: the faces of the person's photos are compared (cosine similarity)
at the model's verdict threshold for a one-face gallery (:func:`enrol_threshold`,
recorded in the index as ``people.threshold``): the face most of the person's
other photos agree with seeds the person, then each photo's face most similar to
the mean of the person's other chosen faces is taken if it reaches the threshold.
A photo where none does (a bystander alone, a group without the person) is
counted ``person_not_found`` in the report and its faces stay unnamed. When no
two of a person's photos agree (a person with one photo, or photos that disagree)
there is nothing to check against: a lone face is taken, as the folder says, and
a photo with several faces names nobody (``person_ambiguous``). ``add`` compares
a person's new photos with the faces already enrolled under the name (and
re-decides that person's photos where the person was not found before); enrolled
faces never change name, and ``remove`` changes nobody else's.

``add`` embeds only photos whose content the index has not seen, and follows the
files under the folder it scans: a photo whose content changed at an indexed
path is re-embedded (its old faces go, ``replaced``); an indexed content found at
a new path whose old path no longer holds it is ``moved`` (its path, and its
person, are updated; nothing is embedded again); an indexed photo under the
scanned folder whose file is gone is reported (``gone``) and dropped with
``--prune``. ``index info --check`` checks every indexed photo (missing, changed,
unreadable) and looks for the missing ones under the index's roots (moved);
``index remove --missing`` applies the moves it finds and drops the rest.
``remove PATH`` drops the photo at that path (a file, or every photo under a
folder), paths resolved like build's, a relative path taken from the current
folder; or, for an existing file, the photo with that file's content. All
refuse a model other than the index's, which the index identifies by its
fingerprint (SHA-256 of the model's config, preprocessing record and weights):
embeddings of two models cannot be compared.

``search`` answers, for each face of each query photo, the most similar indexed
faces (cosine similarity of L2-normalised embeddings) grouped by person: a
person's best face ranks the person, and their other faces among the candidates
follow under it (``"also"``, at most ``--also``); an unnamed face stands alone.
``--top N`` is N such entries (people or unnamed faces). The verdict is ``match``
when the best similarity reaches the model's threshold for a gallery of this
index's size (:func:`facesearch.contract.verdict`: calibrated so that a search for
someone not in the index matches at most at the model's target FPIR, see
:mod:`facesearch.verification`), else ``no_match``; ``"person"`` names who matched
(the best face's person; ``null`` when that face is unnamed) or is ``"unknown"``
after ``no_match`` (read ``"verdict"`` first: a person folder may be called
"unknown"). A model without a calibration gets
:data:`facesearch.contract.FALLBACK_THRESHOLD` and a warning; ``--threshold``
overrides either. With ``--json``, one line per face::

    {"photo": "me.jpg", "box": [x, y, w, h], "verdict": "match" | "no_match", "person": "alice" | null | "unknown",
     "similarity": 0.91, "threshold": 0.87,
     "results": [{"rank": 1, "person": "alice", "similarity": 0.91, "photo": "/abs/alice/1.jpg", "box": [...],
                  "photo_status": "current", "also": [{"similarity": 0.88, "photo": ..., "box": ...,
                                                       "photo_status": "current"}, ...]}, ...]}

A query that cannot be searched gets one line with ``"box": null``, no results,
``"person": null``, a ``"reason"`` (the manifest reason) and its own verdict:
``missing`` (no such file), ``unreadable`` (not a regular file, not read, not an
image, broken) or ``no_face`` (a photo, but no usable face in it); ``search``
exits 2 when no query could be searched. ``"photo_status"`` says whether the file
at a result's path still holds the indexed content (:func:`source_status`:
``current``, ``changed``, ``missing`` or ``unreadable``); anything but
``current`` must not be shown as that face's photo. Only the photos of the
results listed are read and hashed, once per command (12-26 ms for a 5 MB photo on
a shared 2-core CPU), never the whole index. Boxes are in the photo's own pixels
(after EXIF orientation).

The index is a folder::

    INDEX/CURRENT             the name of the live version (one line), replaced atomically
    INDEX/v000003-<hex>/      a version, never modified once CURRENT names it
        embeddings.npy        (faces, d) float32, L2-normalised; row i <-> faces.parquet row i
        faces.parquet         FACE_DTYPES: photo, content hash, face number, box, person (the named face only)
        photos.parquet        PHOTO_DTYPES: every photo read (those without faces too, with why)
        index.json            format, version, previous version, the model (path, fingerprint, preprocessing),
                              roots and their layouts, the enrolment threshold, search settings
        hnsw.faiss            the HNSW graph (faiss.write_index), present when faces >= hnsw_threshold

``add`` and ``remove`` write a whole new version beside the live one, then
replace ``CURRENT`` (``os.replace``): killed at any point, the index is the old
version, complete. A write that fails (a full disk) deletes its half-written
version and says so in one line; a version left by a killed writer is deleted
by the next build/add/remove. The version before the live one is kept, so a
search that read ``CURRENT`` just before a switch still finds its files.
Writers take an exclusive lock (``INDEX/.lock``); readers take none.

Search structure: exact brute force (:class:`facesearch.search.ExactIndex`)
below ``hnsw_threshold`` faces, FAISS HNSW (approximate) from there on. At
100k faces exact search takes ~1.2 ms a query on a 2-core CPU and HNSW ~0.4 ms
at recall@10 ~0.91 (``bench/index.py``), so the default keeps search exact up
to a million faces. ``add`` inserts the new faces into the stored graph;
``remove`` (and an ``add`` that drops photos) rebuilds it (HNSW cannot delete).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from facesearch.data import manifest as M
from facesearch.data.celeba import DatasetError, raw_name, storable_name
from facesearch.data.images import ImageRejected, decode_image
from facesearch.data.layouts import (
    AUTO,
    FOLDERS,
    GALLERY_LAYOUTS,
    PLAIN,
    PhotoFile,
    Skip,
    assign_people,
    list_photo_files,
)
from facesearch.data.manifest import Reason, SchemaError
from facesearch.data.manifest import _check_columns as check_columns  # the manifest's column and dtype check
from facesearch.faces.config import FaceConfig
from facesearch.faces.cropping import CropLimits, read_photo, shape_reason
from facesearch.gallery import photos
from facesearch.io import normal_permissions, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from facesearch.nets.contract import model_preprocessing, preprocessing_record
from facesearch.nets.distances import unit_rows
from facesearch.nets.models import ModelFileError, load_model, resolve_device
from facesearch.retrieval.knn import CheckedIndex, FaissIndex, build_index, cosine_similarity
from facesearch.retrieval.verdict import Verdict, verdict

log = logging.getLogger("facesearch.index")

# index.json "format": bumped when the folder's layout or meaning changes. 2: one face per photo named
# after its person (1 named every face), roots resolved, the roots' layouts and the previous version recorded.
FORMAT = 2
POINTER = "CURRENT"
LOCK = ".lock"
EMBEDDINGS, FACES, PHOTOS = "embeddings.npy", "faces.parquet", "photos.parquet"
RECORD, GRAPH = "index.json", "hnsw.faiss"
VERSION_NAME = re.compile(r"v\d{6,}-[0-9a-f]{8}")  # write_version's folder names
# Faces from which the index searches with HNSW instead of exactly. Exact search grows linearly,
# ~1.2 ms a query at 100k faces on a 2-core CPU (bench/index.py), so ~12 ms at a million: still
# instant next to loading the index, and exact. HNSW is only ~3x faster at 100k and misses ~9% of
# the true top 10; it pays off beyond a million faces.
DEFAULT_HNSW_THRESHOLD = 1_000_000
HNSW_M, EF_SEARCH = 32, 64  # FaissIndex's defaults: graph links per node, candidates explored per search
EMBED_BATCH = 256  # crops gathered across photos before a forward pass (~36 MB at 218 px)
# The crop stage's file and image limits (crop.max_file_bytes, max_pixels, min_image_side, max_aspect).
LIMITS = CropLimits()
ALSO = 4  # search: a person's other faces listed under their entry, at most

# Skip reasons that are not a photo's own (manifest Reason values are the rest).
DUPLICATE = "duplicate"  # the same bytes as an earlier file of this run
ALREADY_INDEXED = "already_indexed"  # add: the index holds this content already
# Person folders: why a photo's faces are all indexed unnamed (counted in the build/add report).
PERSON_NOT_FOUND = "person_not_found"  # no face agrees with the person's other photos
PERSON_AMBIGUOUS = "person_ambiguous"  # several faces, and no other photo of the person to tell which
# Search verdicts of a query that could not be searched (never "no_match": that is a stranger's).
MISSING, UNREADABLE, NO_FACE = "missing", "unreadable", "no_face"
# Whether the file at an indexed path still holds the indexed content (source_status).
CURRENT, CHANGED = "current", "changed"

# --- the tables ----------------------------------------------------------------------------
ROOT = "root"  # the folder given to build/add, absolute and resolved (os.path.realpath)
PHOTO = "photo"  # path relative to root, "/"-separated (each part a facesearch.celeba.storable_name)
SHA256 = M.SHA256  # content hash of the photo file's bytes
# photos: the person folder's name under layout folders, null otherwise; faces: that name on the one
# face that is the person (find_person), null on every other face.
PERSON = "person"
WIDTH, HEIGHT = M.WIDTH, M.HEIGHT  # decoded size (after EXIF orientation), px; null when not decoded
N_FACES = M.N_FACES  # faces indexed from this photo
REASON = M.REASON  # why a photo has no indexed face (a manifest Reason); null when it has some
FACE = "face"  # face number within its photo, 1-based, in photo order (facesearch.photos.detect)
BOX_X, BOX_Y, BOX_W, BOX_H = M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H  # face box in the photo's pixels
DETECTOR = M.DETECTOR

PHOTO_DTYPES: dict[str, str] = {
    ROOT: "string", PHOTO: "string", SHA256: "string", PERSON: "string", WIDTH: "Int32", HEIGHT: "Int32",
    N_FACES: "Int16", REASON: "string",
}  # fmt: skip
FACE_DTYPES: dict[str, str] = {
    ROOT: "string", PHOTO: "string", SHA256: "string", FACE: "Int16", PERSON: "string",
    BOX_X: "Int32", BOX_Y: "Int32", BOX_W: "Int32", BOX_H: "Int32", DETECTOR: "string",
}  # fmt: skip
_HEX = set("0123456789abcdef")


class PhotoIndexError(RuntimeError):
    """The index cannot do what was asked; the message says why, for the user."""


def validate_index(faces: pd.DataFrame, photo_table: pd.DataFrame, embeddings: np.ndarray, dim: int) -> None:
    """Check an index version's tables and embeddings against their schema and each other.

    Called before every write (and on every load), so a bug cannot leave an index
    whose rows and embeddings disagree.
    """
    check_columns(faces, FACE_DTYPES, "faces")
    check_columns(photo_table, PHOTO_DTYPES, "photos")
    if embeddings.dtype != np.float32 or embeddings.shape != (len(faces), dim):
        raise SchemaError(f"embeddings: {embeddings.dtype} {embeddings.shape}, expected float32 {(len(faces), dim)}")
    if len(embeddings):
        if not np.isfinite(embeddings).all():
            raise SchemaError("embeddings: not all finite")
        if np.abs(np.linalg.norm(embeddings, axis=1) - 1).max() > 1e-3:
            raise SchemaError("embeddings: not L2-normalised")
    p = photo_table
    for col in (ROOT, PHOTO, SHA256, N_FACES):
        if p[col].isna().any():
            raise SchemaError(f"photos: {col} must be present")
    if not all(len(h) == 64 and set(h) <= _HEX for h in p[SHA256]):
        raise SchemaError("photos: sha256 must be 64 lower-case hex digits")
    if p[SHA256].duplicated().any():
        raise SchemaError("photos: a content is indexed twice")
    full = pd.Series([_join(r, ph) for r, ph in zip(p[ROOT], p[PHOTO], strict=True)], dtype=object)
    if full.duplicated().any():
        raise SchemaError("photos: a path is indexed twice")
    if not all(os.path.isabs(r) and os.path.normpath(r) == r for r in p[ROOT]):
        raise SchemaError("photos: root must be an absolute, normalised path")
    # The folder walk lists only real entries below the root: a ".." or empty part would point elsewhere.
    if not all(all(part not in ("", ".", "..") for part in rel.split("/")) for rel in p[PHOTO]):
        raise SchemaError("photos: a photo path must lie below its root (no empty, '.' or '..' parts)")
    has_faces = p[N_FACES] > 0
    if (p[N_FACES] < 0).any() or p.loc[has_faces, REASON].notna().any() or p.loc[~has_faces, REASON].isna().any():
        raise SchemaError("photos: a photo has faces or a reason, never both")
    unknown = set(p[REASON].dropna()) - {r.value for r in Reason}
    if unknown:
        raise SchemaError(f"photos: unknown reasons {sorted(unknown)}")
    f = faces
    for col in FACE_DTYPES:
        if col != PERSON and f[col].isna().any():
            raise SchemaError(f"faces: {col} must be present")
    if (f[BOX_W] <= 0).any() or (f[BOX_H] <= 0).any():
        raise SchemaError("faces: boxes must have positive size")
    # Each photo's faces are numbered 1..n_faces, and agree with the photo's row.
    expected = p.loc[has_faces, [SHA256, N_FACES]].set_index(SHA256)[N_FACES]
    counts = f.groupby(SHA256, sort=False)[FACE].agg(["count", "min", "max"])
    counts = counts.reindex(expected.index)
    if (
        len(counts) != f[SHA256].nunique()
        or counts.isna().any().any()
        or not ((counts["count"] == expected) & (counts["min"] == 1) & (counts["max"] == expected)).all()
    ):
        raise SchemaError("faces: each photo's faces must be numbered 1..n_faces, once each")
    joined = f.merge(p, on=SHA256, how="left", suffixes=("", "_photo"))
    for col in (ROOT, PHOTO):
        if not joined[col].equals(joined[f"{col}_photo"]):
            raise SchemaError(f"faces: {col} disagrees with the photo's row")
    # A face is named after its photo's person or not at all, and one face a photo at most.
    named = joined[PERSON].notna()
    if not (joined.loc[named, PERSON] == joined.loc[named, f"{PERSON}_photo"]).all():
        raise SchemaError("faces: a face is named after someone other than its photo's person")
    if joined.loc[named, SHA256].duplicated().any():
        raise SchemaError("faces: more than one face of a photo is named after its person")


# --- the model ---------------------------------------------------------------------------------
def model_fingerprint(payload: dict) -> str:
    """SHA-256 of what decides a model's embeddings: config, preprocessing and weights.

    Not of the file: a file re-saved with new metadata (a threshold, metrics) but the
    same weights and crops embeds the same, and is the same model to the index.
    """
    face, size = model_preprocessing(payload)
    h = hashlib.sha256()
    meta = {"config": payload["config"], "preprocessing": preprocessing_record(face, size)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, tensor in sorted(payload["state_dict"].items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class Embedder:
    """A loaded model with its crop settings, input side and fingerprint."""

    path: str
    model: torch.nn.Module
    payload: dict
    settings: FaceConfig
    size: int
    fingerprint: str
    device: torch.device

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> Embedder:
        """The model file at ``path``; :class:`PhotoIndexError` (one line) when it is missing or no model."""
        if not Path(path).is_file():
            raise PhotoIndexError(f"model file {path} does not exist")
        try:
            model, payload = load_model(path)  # on the CPU: the fingerprint reads the weights there
        except ModelFileError as exc:
            raise PhotoIndexError(str(exc)) from None
        except OSError as exc:
            raise PhotoIndexError(f"model file {path} cannot be read: {exc.strerror or exc}") from None
        dev = resolve_device(device)
        settings, size = model_preprocessing(payload)
        return cls(os.path.abspath(path), model.to(dev), payload, settings, size, model_fingerprint(payload), dev)

    def record(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "backbone": self.model.config.backbone,
                "embedding_dim": self.model.config.embedding_dim,
                "preprocessing": preprocessing_record(self.settings, self.size)}  # fmt: skip

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return unit(photos.embed(self.model, crops, self.size, self.device))


def enrol_threshold(embedder: Embedder) -> tuple[float, str]:
    """(similarity, source) at which two faces count as one person when enrolling people (:func:`find_person`).

    The model's verdict threshold for a gallery of one face: a face compared with one
    other face (or with the mean of a person's faces) is a 1:1 decision.
    """
    v = verdict(embedder.payload, 1)
    if v.warning():  # who is named after whom rests on it too
        log.warning("enrolling people: %s", v.warning())
    return v.similarity, v.source


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (:func:`facesearch.distances.unit_rows`), float32: a model saved with
    normalize false has longer ones."""
    return unit_rows(np.asarray(x, np.float32))


def read_file(path: bytes | str, limits: CropLimits) -> tuple[bytes, str]:
    """(bytes, SHA-256) of a photo file, or :class:`ImageRejected` (not a file, unreadable, too big)."""
    data = read_photo(path, limits.max_file_bytes)
    return data, hashlib.sha256(data).hexdigest()


def file_faces(data: bytes, settings: FaceConfig, limits: CropLimits) -> tuple[tuple[int, int], tuple, np.ndarray, str]:
    """((width, height), boxes, crops, detector) of every face in a photo's bytes, or :class:`ImageRejected`.

    Decoded at full resolution like the crop stage's photos, so boxes are in the
    photo's own pixels and crops are cut as the model's training crops were.
    """
    image = decode_image(data, limits.max_pixels)
    reason = shape_reason(image.width, image.height, limits)
    if reason is not None:
        raise ImageRejected(reason, f"{image.width}x{image.height}")
    detection = photos.detect(image.rgb, settings)
    return (image.width, image.height), detection.boxes, photos.crops(image.rgb, detection.boxes, settings), \
        detection.detector  # fmt: skip


# --- paths -------------------------------------------------------------------------------------
def _join(root: str, rel: str) -> str:
    """The absolute path of an indexed photo as shown (``rel``'s parts as stored)."""
    return f"{root.rstrip('/')}/{rel}"


def photo_path(root: str, rel: str) -> bytes:
    """The path that opens an indexed photo (a stored part that escapes a non-UTF-8 byte is unescaped)."""
    return os.path.join(os.fsencode(root), raw_name(rel))


def _rel_under(path: str, root: str) -> str | None:
    """``path`` relative to ``root``, "/"-separated ("" for the root itself); None outside it. Strings only."""
    if path == root:
        return ""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def _stored_rel(path: str, root: str) -> str | None:
    """A file system path's place under ``root`` as the index stores it (:func:`storable_name` parts)."""
    rel = _rel_under(path, root)
    return None if rel is None else "/".join(storable_name(os.fsencode(part)) for part in rel.split("/") if part)


def resolve(path: str | os.PathLike) -> str:
    """``path`` as the index stores it: absolute (relative to the current folder), its folders resolved.

    A folder resolves whole; a file keeps its own name (a symlinked photo is indexed at the
    link's path, as the folder walk lists it) below its resolved folder.
    """
    absolute = os.path.abspath(path)
    if os.path.isdir(absolute):
        return os.path.realpath(absolute)
    head, tail = os.path.split(absolute)
    return os.path.join(os.path.realpath(head), tail)


def _content(path: bytes, limits: CropLimits) -> str | None:
    """The SHA-256 of the file at ``path``, or None when there is none or it cannot be read."""
    try:
        return read_file(path, limits)[1]
    except ImageRejected:
        return None


def source_status(path: str | bytes | os.PathLike, sha256: str, limits: CropLimits = LIMITS) -> str:
    """Whether the file at an indexed photo's path still holds the indexed content.

    ``"current"`` (the same SHA-256), ``"changed"`` (other bytes), ``"missing"`` (no
    regular file there) or ``"unreadable"`` (there, but it cannot be read). Reads and
    hashes the whole file (12-26 ms for 5 MB on a shared 2-core CPU): call it for the photos
    about to be shown, not for a whole index. Anything but ``"current"`` must not be shown as the photo
    of the indexed face (its box is the old content's).
    """
    try:
        _, sha = read_file(path, limits)
    except ImageRejected as exc:
        if exc.reason == Reason.NOT_A_FILE:
            return MISSING
        if exc.reason == Reason.FILE_TOO_LARGE:  # the indexed content was within the limit
            return CHANGED
        return UNREADABLE
    return CURRENT if sha == sha256 else CHANGED


def photo_is_current(root: str, photo: str, sha256: str, limits: CropLimits = LIMITS) -> bool:
    """Whether the indexed photo ``photo`` (a faces/photos row's ROOT, PHOTO, SHA256) may be shown."""
    return source_status(photo_path(root, photo), sha256, limits) == CURRENT


# --- embedding photos ------------------------------------------------------------------------
@dataclass
class Batch:
    """What embedding a list of photo files produced: rows for both tables, embeddings, skips."""

    photo_rows: list[dict] = field(default_factory=list)
    face_rows: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    hashed: dict[str, str] = field(default_factory=dict)  # rel -> SHA-256 of every file read, known ones too

    def vectors(self, dim: int) -> np.ndarray:
        return np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float32)


def embed_files(
    files: Sequence[PhotoFile], root: str, embedder: Embedder, limits: CropLimits, known: frozenset[str] = frozenset()
) -> Batch:
    """Read, hash, decode, detect, crop and embed every face of ``files`` (under ``root``).

    A file whose content is in ``known`` (or repeats an earlier file) is skipped
    before decoding. Never raises for anything one file does: known failures are
    photo rows with a reason (content that is no photo stays "seen" for ``add``),
    unexpected ones (a detector bug a hostile file triggers) a logged ``error``
    skip, retried by the next ``add``. Faces are named after ``file.person`` for now;
    :func:`enrol` decides which one is the person.
    """
    out, seen, pending = Batch(), set(known), []

    def flush() -> None:
        if pending:
            out.embeddings.append(embedder.embed(np.concatenate(pending)))
            pending.clear()

    n_pending = 0
    for file in files:
        try:
            data, sha = read_file(file.path, limits)
        except ImageRejected as exc:
            out.skips.append(Skip(file.rel, str(exc.reason), exc.detail))
            continue
        out.hashed[file.rel] = sha
        if sha in seen:
            out.skips.append(Skip(file.rel, ALREADY_INDEXED if sha in known else DUPLICATE))
            continue
        seen.add(sha)
        row = {ROOT: root, PHOTO: file.rel, SHA256: sha, PERSON: file.person, WIDTH: None, HEIGHT: None,
               N_FACES: 0, REASON: None}  # fmt: skip
        try:
            (row[WIDTH], row[HEIGHT]), boxes, crops, detector = file_faces(data, embedder.settings, limits)
        except ImageRejected as exc:
            out.photo_rows.append(row | {REASON: str(exc.reason)})
            continue
        except Exception as exc:  # the point: one photo never ends the run
            log.warning("%s: unexpected %s: %s; skipped", file.rel, type(exc).__name__, exc)
            out.skips.append(Skip(file.rel, Reason.ERROR.value, f"{type(exc).__name__}: {exc}"))
            continue
        if not boxes:
            out.photo_rows.append(row | {REASON: Reason.NO_FACE.value})
            continue
        out.photo_rows.append(row | {N_FACES: len(boxes)})
        for number, (x, y, w, h) in enumerate(boxes, start=1):
            out.face_rows.append({ROOT: root, PHOTO: file.rel, SHA256: sha, FACE: number, PERSON: file.person,
                                  BOX_X: x, BOX_Y: y, BOX_W: w, BOX_H: h, DETECTOR: detector})  # fmt: skip
        pending.append(crops)
        n_pending += len(crops)
        if n_pending >= EMBED_BATCH:
            flush()
            n_pending = 0
    flush()
    return out


def _table(rows: list[dict], dtypes: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)


# --- people ------------------------------------------------------------------------------------
def find_person(anchors: np.ndarray, faces: Sequence[np.ndarray], threshold: float,
                rounds: int = 20) -> list[tuple[int | None, str | None]]:  # fmt: skip
    """Which face of each of one person's photos is that person: ``(face position or None, note)`` a photo.

    ``anchors``: unit embeddings (k, d) of faces already enrolled as the person (k may be 0);
    ``faces``: for each photo to decide, the unit embeddings (n_i >= 1, d) of its faces.
    Similarities are cosines, compared with ``threshold`` (:func:`enrol_threshold`).

    Without anchors the person is seeded by the face most of the other photos agree with
    (the most photos holding a face at ``threshold`` or more from it, then the highest sum
    of those similarities, then photo order). From the anchors or the seed, each photo takes
    its face most similar to the mean of the person's *other* chosen faces (the anchors and
    the other photos' choices: a photo never votes for itself) when that similarity reaches
    ``threshold``, else none (``person_not_found``); repeated until nothing changes. When
    there are no anchors and no two photos agree on any face, nothing contradicts the
    folder: a lone face is taken, and a photo with several faces names nobody
    (``person_ambiguous``).
    """
    m = len(faces)
    if not m:
        return []
    choice: list[int | None] = [None] * m
    if not len(anchors):
        seed = _seed(faces, threshold)
        if seed is None:
            return [(0, None) if len(f) == 1 else (None, PERSON_AMBIGUOUS) for f in faces]
        choice[seed[0]] = seed[1]
    base = np.asarray(anchors, np.float64).sum(0) if len(anchors) else np.zeros(faces[0].shape[1])
    for _ in range(rounds):
        chosen = [faces[i][c] for i, c in enumerate(choice) if c is not None]
        total = base + (np.sum(chosen, 0, dtype=np.float64) if chosen else 0.0)
        members = len(anchors) + len(chosen)
        new: list[int | None] = []
        for i, f in enumerate(faces):
            own = choice[i] is not None
            if members - own == 0:  # the seed alone: nothing else to hold it to
                new.append(choice[i])
                continue
            centre = total - (f[choice[i]] if own else 0.0)
            sims = f @ (centre / max(float(np.linalg.norm(centre)), 1e-12))
            j = int(np.argmax(sims))
            new.append(j if sims[j] >= threshold else None)
        if new == choice:
            break
        choice = new
    return [(c, None if c is not None else PERSON_NOT_FOUND) for c in choice]


def _seed(faces: Sequence[np.ndarray], threshold: float, block: int = 1024) -> tuple[int, int] | None:
    """(photo, face) that most other photos agree with (see :func:`find_person`); None when no two agree."""
    m = len(faces)
    if m < 2:
        return None
    stacked = np.concatenate(faces).astype(np.float32)
    sizes = np.array([len(f) for f in faces])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.repeat(np.arange(m), sizes)
    best, best_key = None, 0.0
    for s in range(0, len(stacked), block):  # in blocks: a person with 10k faces would need 400 MB at once
        sims = stacked[s : s + block] @ stacked.T
        per_photo = np.maximum.reduceat(sims, starts, axis=1)  # each face's best match in each photo
        per_photo[np.arange(len(sims)), owner[s : s + block]] = -np.inf  # not its own photo
        agree = per_photo >= threshold
        # Photos agreeing first, their similarity second: the sum is below (m + 1), so it only breaks ties.
        key = agree.sum(1) * (m + 1.0) + np.where(agree, per_photo, 0.0).sum(1)
        r = int(np.argmax(key))
        if key[r] > best_key and agree[r].any():
            best, best_key = s + r, float(key[r])
    if best is None:
        return None
    photo = int(owner[best])
    return photo, int(best - starts[photo])


def enrol(faces: pd.DataFrame, photo_table: pd.DataFrame, embeddings: np.ndarray, decide: set[str],
          threshold: float) -> tuple[pd.DataFrame, dict[str, str]]:  # fmt: skip
    """Name the face that is its photo's person (:func:`find_person`) for the photos ``decide`` names.

    ``decide``: SHA-256s of photos (new, or moved to another person) whose faces are
    (re)named; every other named face keeps its name and is the person's anchor. A person
    with a photo to decide has their undecided older photos (person not found) decided
    again with them. Returns (faces with PERSON set, {sha: note} for the photos of
    ``decide`` where the person was not found or is ambiguous).
    """
    p = photo_table
    rows_of = faces.groupby(SHA256, sort=False).indices
    number = faces[FACE].to_numpy()
    person = np.array([None if pd.isna(x) else str(x) for x in faces[PERSON]], dtype=object)
    for sha in decide:
        if sha in rows_of:
            person[rows_of[sha]] = None
    with_faces = p[(p[N_FACES] > 0) & p[PERSON].notna()]
    people = sorted(set(with_faces.loc[with_faces[SHA256].isin(decide), PERSON]))
    shas_of = with_faces.groupby(PERSON, sort=False)[SHA256].agg(list)
    notes: dict[str, str] = {}
    for name in people:
        rows = {sha: rows_of[sha][np.argsort(number[rows_of[sha]])] for sha in shas_of[name]}
        anchor_rows = [r for sha in shas_of[name] for r in rows[sha] if person[r] == name]
        todo = [sha for sha in shas_of[name] if not any(person[r] == name for r in rows[sha])]
        answers = find_person(embeddings[anchor_rows], [embeddings[rows[sha]] for sha in todo], threshold)
        for sha, (chosen, note) in zip(todo, answers, strict=True):
            if chosen is not None:
                person[rows[sha][chosen]] = name
            elif sha in decide:
                notes[sha] = note
    return faces.assign(**{PERSON: pd.array(list(person), dtype="string")}), notes


# --- the index folder ------------------------------------------------------------------------
@dataclass
class PhotoIndex:
    """One version of an index, loaded."""

    folder: Path
    version: str  # the version folder's name
    record: dict  # index.json
    embeddings: np.ndarray
    faces: pd.DataFrame
    photos: pd.DataFrame
    graph: object | None = None  # the stored faiss HNSW graph, when there is one

    @property
    def dim(self) -> int:
        return int(self.record["model"]["embedding_dim"])

    def structure(self) -> CheckedIndex | None:
        """The search structure: the stored HNSW graph, or exact search; None for an empty index."""
        if not len(self.faces):
            return None
        if self.graph is not None:
            return CheckedIndex(StoredHNSW(self.graph, self.record["ef_search"]), len(self.faces))
        return build_index(self.embeddings, "exact")

    def roots(self) -> dict[str, str]:
        """Each root (folder given to build/add) and its layout (folders or plain)."""
        roots = dict(self.record.get("roots") or {})
        for root, named in self.photos.groupby(ROOT, sort=True)[PERSON].agg(lambda s: s.notna().any()).items():
            roots.setdefault(str(root), FOLDERS if named else PLAIN)  # a version written without the record
        return roots

    def enrol_threshold(self, embedder: Embedder | None = None) -> tuple[float, str]:
        """The threshold this index enrols people at: the one it was built with, so decisions stay alike.

        A version written without one (``bench/index.py``'s) takes the model's (loaded when not given).
        """
        people = self.record.get("people") or {}
        if people.get("threshold") is not None:
            return float(people["threshold"]), str(people.get("source", "recorded"))
        return enrol_threshold(embedder or self.embedder())

    def embedder(self, model: str | None = None, device: str = "cpu") -> Embedder:
        """``model`` (default: the one the index was built from), refused unless it is the index's model."""
        path = model or self.record["model"]["path"]
        if not Path(path).is_file():
            raise PhotoIndexError(f"model file {path} does not exist" + ("" if model else
                                  " (the index's model): pass --model where it is now"))  # fmt: skip
        embedder = Embedder.load(path, device)
        self.check_model(embedder)
        return embedder

    def check_model(self, embedder: Embedder) -> None:
        """Refuse a model other than the one this index was built with."""
        own = self.record["model"]
        if embedder.fingerprint != own["fingerprint"]:
            raise PhotoIndexError(
                f"{embedder.path} is not the model this index was built with: its fingerprint is "
                f"{embedder.fingerprint[:12]}, the index's {own['fingerprint'][:12]} ({own['backbone']}, built from "
                f"{own['path']}). Embeddings of different models cannot be compared: use that model, or build "
                "a new index with this one (index build)."
            )


class StoredHNSW(FaissIndex):
    """:class:`FaissIndex` over an HNSW graph read back from disk instead of built.

    FaissIndex builds its graph in ``__init__``; this sets the attributes its
    ``search`` reads (kind, size, ef_search, the faiss module and index), so a
    stored graph answers through the same code (budget, short-answer retries).
    """

    def __init__(self, graph, ef_search: int):
        import faiss

        self.faiss, self.kind, self.n, self.ef_search, self.index = faiss, "hnsw", int(graph.ntotal), ef_search, graph


def _read_pointer(folder: Path) -> str:
    try:
        name = (folder / POINTER).read_text().strip()
    except FileNotFoundError:
        raise PhotoIndexError(f"{folder} is not a photo index (no {POINTER} file); make one with index build") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PhotoIndexError(f"{folder}/{POINTER} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not name or "/" in name or not (folder / name).is_dir():
        raise PhotoIndexError(f"{folder}/{POINTER} names {name!r}, which is not a version of this index")
    return name


def _live(folder: Path) -> str | None:
    """The name CURRENT holds, or None (no index yet, or unreadable)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return (folder / POINTER).read_text().strip() or None
    return None


def load_index(folder: str | os.PathLike) -> PhotoIndex:
    """The live version of the index in ``folder``, checked; :class:`PhotoIndexError` when it cannot be read."""
    folder = Path(folder)
    name = _read_pointer(folder)
    vdir = folder / name
    try:
        record = json.loads((vdir / RECORD).read_text())
        if not isinstance(record, dict):
            raise SchemaError(f"{RECORD} holds no record")
    except (OSError, ValueError) as exc:
        raise PhotoIndexError(f"{vdir} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    if record.get("format") == 1:
        raise PhotoIndexError(
            f"{folder} was written by an earlier facesearch (index format 1: every face of a person's photo named "
            f"after the person, paths as typed); rebuild it: python -m facesearch index build --model MODEL "
            f"--photos DIR --out {folder} --force"
        )
    if record.get("format") != FORMAT:
        raise PhotoIndexError(f"{folder}: index format {record.get('format')}, this version reads {FORMAT}")
    try:
        embeddings = np.load(vdir / EMBEDDINGS, allow_pickle=False)
        faces, photo_table = pd.read_parquet(vdir / FACES), pd.read_parquet(vdir / PHOTOS)
        validate_index(faces, photo_table, embeddings, int(record["model"]["embedding_dim"]))
        graph = None
        if record["structure"] == "hnsw":
            import faiss

            graph = faiss.read_index(str(vdir / GRAPH))
            if graph.ntotal != len(faces):
                raise SchemaError(f"{vdir / GRAPH}: {graph.ntotal} vectors for {len(faces)} faces")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a damaged version: faiss raises RuntimeError
        raise PhotoIndexError(f"{vdir} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    return PhotoIndex(folder, name, record, embeddings, faces, photo_table, graph)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """An exclusive lock on the index folder for one writer (build into it, add, remove)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PhotoIndexError(f"{folder} is being changed by another index command; try again") from None
        yield


def clean_stale(folder: Path) -> list[str]:
    """Delete what no reader can be using: versions other than the live one and the one before it.

    Those are versions a killed or failed writer left half-written (or finished but never
    named by CURRENT), and a killed pointer write's temporary file. Caller holds
    :func:`writing`. A live version written without a ``previous`` record keeps every
    complete version (one of them may be it). Returns the names deleted.
    """
    keep: set[str] = set()
    live = _live(folder)
    complete_too = False  # no live version: no reader can be using any
    if live:
        keep.add(live)
        try:
            previous = json.loads((folder / live / RECORD).read_text()).get("previous", ...)
        except (OSError, ValueError, AttributeError):
            previous = ...
        if previous is ...:
            complete_too = True
        elif previous:
            keep.add(previous)
    gone = []
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink() and VERSION_NAME.fullmatch(entry.name):
            if entry.name in keep or (complete_too and (entry / RECORD).is_file()):
                continue
        elif not (entry.is_file() and entry.name.startswith(f".{POINTER}.") and entry.name.endswith(".tmp")):
            continue
        (shutil.rmtree if entry.is_dir() else os.unlink)(entry)
        gone.append(entry.name)
    if gone:
        log.info("%s: deleted %d unfinished or unused versions: %s", folder, len(gone), ", ".join(sorted(gone)))
    return gone


def search_graph(embeddings: np.ndarray, record: dict, previous: PhotoIndex | None, appended: bool):
    """The HNSW graph for ``embeddings`` (None below the threshold).

    ``appended``: ``embeddings`` are the previous version's plus new rows at the end,
    so the previous graph (in memory; its file is not touched) takes just the new rows.
    """
    if len(embeddings) < record["hnsw_threshold"]:
        return None
    if appended and previous is not None and previous.graph is not None:
        graph = previous.graph
        graph.add(np.ascontiguousarray(embeddings[graph.ntotal :]))
        return graph
    built = FaissIndex(embeddings, "hnsw", hnsw_m=record["hnsw_m"], ef_search=record["ef_search"])
    return built.index


def write_version(folder: Path, record: dict, embeddings: np.ndarray, faces: pd.DataFrame,
                  photo_table: pd.DataFrame, graph) -> str:  # fmt: skip
    """Write a complete new version beside the live one, then switch ``CURRENT`` to it atomically.

    Caller holds :func:`writing`. Returns the new version's name. A write that fails
    (a full disk, a read-only folder) deletes what it wrote and raises
    :class:`PhotoIndexError` saying so in one line; the live version is untouched.
    """
    validate_index(faces, photo_table, embeddings, int(record["model"]["embedding_dim"]))
    live = _live(folder)
    record = record | {"structure": "exact" if graph is None else "hnsw", "faces": len(faces), "previous": live}
    name = f"v{record['version']:06d}-{secrets.token_hex(4)}"
    vdir = folder / name
    try:
        vdir.mkdir()  # invisible until CURRENT names it
        normal_permissions(vdir, directory=True)
        np.save(vdir / EMBEDDINGS, embeddings)
        normal_permissions(vdir / EMBEDDINGS)
        write_parquet_atomic(vdir / FACES, faces)
        write_parquet_atomic(vdir / PHOTOS, photo_table)
        if graph is not None:
            _write_graph(graph, vdir / GRAPH)
        write_json_atomic(vdir / RECORD, record)
        write_bytes_atomic(folder / POINTER, (name + "\n").encode())
    except Exception as exc:  # a kill (KeyboardInterrupt, a signal) leaves it to the next writer's clean_stale
        if _live(folder) != name:  # written in full but for the pointer's directory entry: it is live, keep it
            shutil.rmtree(vdir, ignore_errors=True)
        if isinstance(exc, OSError):
            state = f"the index is unchanged (version {live})" if live else "nothing was written"
            raise PhotoIndexError(f"cannot write a new version of {folder}: {exc.strerror or exc}; {state}") from None
        raise
    # Keep the live version and the one before it (a reader may still be opening it); the rest,
    # finished or killed half-way, goes.
    clean_stale(folder)
    return name


def _write_graph(graph, path: Path) -> None:
    import faiss

    try:
        faiss.write_index(graph, str(path))
    except RuntimeError as exc:  # faiss reports a failed write (a full disk) as RuntimeError
        raise OSError(errno.EIO, f"the search graph could not be written ({_first_line(exc)})") from None
    normal_permissions(path)


# --- following the files -----------------------------------------------------------------------
@dataclass
class FileCheck:
    """Indexed photos whose file is no longer what was indexed (:func:`check_files`); paths as shown."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)  # no file at the path, and not found elsewhere
    changed: list[str] = field(default_factory=list)  # other content at the path, the indexed one not found
    unreadable: list[str] = field(default_factory=list)  # a file there that cannot be read
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha -> (new root, new rel)
    moved_from: dict[str, str] = field(default_factory=dict)  # sha -> old path

    def problems(self) -> int:
        return len(self.missing) + len(self.changed) + len(self.unreadable) + len(self.moved)

    def as_dict(self) -> dict:
        return {"checked": self.checked, "missing": self.missing, "changed": self.changed,
                "unreadable": self.unreadable,
                "moved": [{"from": self.moved_from[s], "to": _join(*self.moved[s])} for s in self.moved]}  # fmt: skip


def check_files(index: PhotoIndex, limits: CropLimits = LIMITS, find_moves: bool = True) -> FileCheck:
    """Read every indexed photo back; look for the lost ones under the index's roots.

    Costs a read and SHA-256 of every indexed photo, and (``find_moves``, when some are
    missing or changed) of every photo under the index's roots that the index does not
    hold at its path (new photos not added yet, and moved ones).
    """
    out = FileCheck()
    p = index.photos
    lost: dict[str, str] = {}  # sha -> old path, for the photos not at their path
    for root, rel, sha in zip(p[ROOT], p[PHOTO], p[SHA256], strict=True):
        status = source_status(photo_path(root, rel), sha, limits)
        out.checked += 1
        if status in (MISSING, CHANGED):
            lost[sha] = _join(root, rel)
        elif status == UNREADABLE:
            out.unreadable.append(_join(root, rel))
    if lost and find_moves:
        out.moved = _find_moved(index, set(lost), limits)
    places = _places(index)
    for sha, path in lost.items():
        if sha in out.moved:
            out.moved_from[sha] = path
        elif os.path.lexists(photo_path(*places[sha])):
            out.changed.append(path)
        else:
            out.missing.append(path)
    return out


def _places(index: PhotoIndex) -> dict[str, tuple[str, str]]:
    """sha -> (root, rel) of every indexed photo."""
    p = index.photos
    return {sha: (str(r), str(ph)) for r, ph, sha in zip(p[ROOT], p[PHOTO], p[SHA256], strict=True)}


def _find_moved(index: PhotoIndex, lost: set[str], limits: CropLimits) -> dict[str, tuple[str, str]]:
    """sha -> (root, rel) of the lost contents found at a path the index does not hold, under its roots."""
    p = index.photos
    held = {_join(r, ph) for r, ph in zip(p[ROOT], p[PHOTO], strict=True)}
    found: dict[str, tuple[str, str]] = {}
    for root, layout in sorted(index.roots().items()):
        try:
            files, _ = list_photo_files(root, exclude=[os.path.realpath(index.folder)])
        except DatasetError:  # the root itself is gone
            continue
        for f in files:
            if _join(root, f.rel) in held or (layout == FOLDERS and f.rel.count("/") != 1):
                continue
            try:
                sha = read_file(f.path, limits)[1]
            except ImageRejected:
                continue
            if sha in lost and sha not in found:
                found[sha] = (root, f.rel)
    return found


def _person_at(rel: str, layout: str) -> str | None:
    return rel.split("/")[0] if layout == FOLDERS else None


# --- the commands ----------------------------------------------------------------------------
@dataclass
class Report:
    """What a build/add/remove did, for the user."""

    faces: int  # in the index now
    photos: int  # photos with at least one indexed face, now
    people: int
    added_faces: int = 0
    added_photos: int = 0
    removed_photos: int = 0  # remove: photos dropped
    replaced_photos: int = 0  # add: photos whose path now holds other content (their faces went)
    moved_photos: int = 0  # add, remove --missing: photos whose path was updated
    without_faces: Counter = field(default_factory=Counter)  # reason -> photos read that gave no face, this run
    person_notes: Counter = field(default_factory=Counter)  # person_not_found / person_ambiguous -> photos
    skips: list[Skip] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # add: indexed photos under the folder whose file is gone
    pruned: bool = False  # add --prune: the gone photos were dropped
    unmatched: list[str] = field(default_factory=list)  # remove: targets that matched nothing
    version: str | None = None  # the version written; None when nothing changed

    def lines(self) -> list[str]:
        out = [f"index: {self.faces} faces in {self.photos} photos, {self.people} people"
               + (f" (version {self.version})" if self.version else " (unchanged)")]  # fmt: skip
        if self.added_photos or self.added_faces:
            out.append(f"added: {self.added_faces} faces from {self.added_photos} photos")
        if self.replaced_photos:
            out.append(f"replaced: {self.replaced_photos} photos whose file now holds other content (old faces gone)")
        if self.moved_photos:
            out.append(f"moved: {self.moved_photos} photos found at a new path (path updated)")
        if self.removed_photos:
            out.append(f"removed: {self.removed_photos} photos")
        if self.gone:
            shown = ", ".join(self.gone[:3]) + (", ..." if len(self.gone) > 3 else "")
            out.append(f"{'pruned' if self.pruned else 'gone'}: {len(self.gone)} indexed photos no longer there "
                       f"({shown})" + ("" if self.pruned else "; index add --prune drops them"))  # fmt: skip
        if self.person_notes:
            out.append("photos whose faces are all indexed unnamed: " + _counts(self.person_notes))
        if self.without_faces:
            out.append("photos without a usable face: " + _counts(self.without_faces))
        if self.skips:
            out.append(f"skipped {len(self.skips)} files: " + _counts(Counter(s.reason for s in self.skips)))
        for target in self.unmatched:
            out.append(f"not in the index: {target}")
        return out


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))


def _people(faces: pd.DataFrame) -> int:
    return int(faces[PERSON].nunique())


def _report(index_faces: pd.DataFrame, photo_table: pd.DataFrame, **kw) -> Report:
    return Report(len(index_faces), int((photo_table[N_FACES] > 0).sum()), _people(index_faces), **kw)


def _log_skips(skips: list[Skip]) -> None:
    for s in skips:
        log.info("skipped %s: %s%s", s.photo, s.reason, f" ({s.detail})" if s.detail else "")


def _log_notes(photo_table: pd.DataFrame, notes: dict[str, str]) -> None:
    where = photo_table.set_index(SHA256)
    for sha, note in notes.items():
        log.info("%s: %s (%s); its faces are indexed unnamed", _join(where.at[sha, ROOT], where.at[sha, PHOTO]),
                 note, where.at[sha, PERSON])  # fmt: skip


@dataclass
class Scan:
    """The photo files under a folder given to build/add, as paths under their root."""

    root: str  # the indexed root they belong to (the folder itself, or an indexed root holding it)
    folder: str  # the folder scanned, resolved
    layout: str  # folders or plain
    files: list[PhotoFile]  # rel: relative to root
    skips: list[Skip]
    listed: set[str]  # rel of every regular file listed (read or not): present on disk


def _scan(photo_dir: str, layout: str, index_dir: Path, roots: dict[str, str] | None = None) -> Scan:
    """List ``photo_dir``; a folder inside an indexed root (of ``roots``) is listed as part of that root."""
    folder = resolve(photo_dir)
    if not os.path.isdir(folder):
        raise PhotoIndexError(f"photo folder {photo_dir} does not exist or is not a folder")
    root, prefix = folder, ""
    for r in sorted(roots or {}, key=len, reverse=True):
        rel = _stored_rel(folder, r)
        if rel is not None:
            root, prefix = r, rel
            break
    recorded = (roots or {}).get(root)
    if recorded and layout not in (AUTO, recorded):
        raise PhotoIndexError(f"{root} is indexed with layout {recorded}; --layout {layout} would name its photos "
                              "otherwise: leave --layout out, or rebuild the index")  # fmt: skip
    try:
        files, skips = list_photo_files(folder, exclude=[os.path.realpath(index_dir)])
        if prefix:
            files = [PhotoFile(f"{prefix}/{f.rel}", f.path) for f in files]
            skips = [Skip(f"{prefix}/{s.photo}", s.reason, s.detail) for s in skips]
        listed = {f.rel for f in files}
        files, outside, used = assign_people(files, recorded or layout)
    except DatasetError as exc:
        raise PhotoIndexError(str(exc)) from None
    log.info("%s: %d files, layout %s%s", folder, len(files), used, f" (in the indexed root {root})" * bool(prefix))
    return Scan(root, folder, used, files, skips + outside, listed)


@dataclass
class _Change:
    """A new version from the live one: photos dropped, moved, added (with their faces and embeddings)."""

    drop: set[str] = field(default_factory=set)  # SHA-256s of photos to drop
    moves: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)  # sha -> (root, rel, person)
    batch: Batch | None = None

    def empty(self) -> bool:
        return not self.drop and not self.moves and not (self.batch and self.batch.photo_rows)


def _apply(old: PhotoIndex, change: _Change, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray,
                                                                       dict[str, str]]:  # fmt: skip
    """(faces, photos, embeddings, person notes) of ``old`` changed by ``change``; new faces go at the end."""
    keep_f = ~old.faces[SHA256].isin(change.drop).to_numpy()
    faces = old.faces[keep_f].reset_index(drop=True)
    photo_table = old.photos[~old.photos[SHA256].isin(change.drop)].reset_index(drop=True)
    embeddings = old.embeddings[keep_f]
    decide: set[str] = set()
    if change.moves:
        at = {sha: i for i, sha in enumerate(photo_table[SHA256])}
        for sha, (root, rel, person) in change.moves.items():
            i = at[sha]
            if not _same(photo_table.at[i, PERSON], person):
                decide.add(sha)  # into another person's folder (or out of one): who it is is decided again
            photo_table.loc[i, [ROOT, PHOTO, PERSON]] = [root, rel, person]
            faces.loc[(faces[SHA256] == sha).to_numpy(), [ROOT, PHOTO]] = [root, rel]
        photo_table = photo_table.astype(PHOTO_DTYPES)
        faces = faces.astype(FACE_DTYPES)
    if change.batch is not None and change.batch.photo_rows:
        b = change.batch
        photo_table = pd.concat([photo_table, _table(b.photo_rows, PHOTO_DTYPES)], ignore_index=True)
        faces = pd.concat([faces, _table(b.face_rows, FACE_DTYPES)], ignore_index=True)
        embeddings = np.concatenate([embeddings, b.vectors(old.dim)])
        decide |= {r[SHA256] for r in b.photo_rows}
    faces, notes = enrol(faces, photo_table, embeddings, decide, threshold)
    return faces, photo_table, np.ascontiguousarray(embeddings, np.float32), notes


def _same(a, b) -> bool:
    return (pd.isna(a) and b is None) or (not pd.isna(a) and a == b)


def _index_entry(name: str) -> bool:
    """Whether a name in an index folder is the index's own (lock, pointer or its temporary file, a version)."""
    return name in (LOCK, POINTER) or bool(VERSION_NAME.fullmatch(name)) or name.startswith(f".{POINTER}.")


def build(
    model: str, photo_dir: str, out: str | os.PathLike, layout: str = AUTO,
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD, force: bool = False, device: str = "cpu",
    limits: CropLimits = LIMITS,
) -> Report:  # fmt: skip
    """Index every face of every photo under ``photo_dir`` with ``model`` into the folder ``out``."""
    folder = Path(out)
    # A folder holding only a lock, version folders and a pointer's temporary file is a build that
    # was killed (or failed) before its first CURRENT.
    if folder.exists() and not (folder / POINTER).is_file() and not all(_index_entry(p.name) for p in folder.iterdir()):
        raise PhotoIndexError(f"{folder} exists and is not a photo index; choose a new folder")
    if (folder / POINTER).is_file() and not force:
        raise PhotoIndexError(f"{folder} is an index already: add photos with index add, or rebuild with --force")
    if hnsw_threshold < 1:
        raise PhotoIndexError(f"--hnsw-threshold must be at least 1, not {hnsw_threshold}")
    embedder = Embedder.load(model, device)
    scan = _scan(photo_dir, layout, folder)
    threshold, source = enrol_threshold(embedder)
    with writing(folder):
        clean_stale(folder)
        batch = embed_files(scan.files, scan.root, embedder, limits)
        faces, photo_table = _table(batch.face_rows, FACE_DTYPES), _table(batch.photo_rows, PHOTO_DTYPES)
        embeddings = batch.vectors(embedder.model.config.embedding_dim)
        faces, notes = enrol(faces, photo_table, embeddings, set(photo_table[SHA256]), threshold)
        record = {"format": FORMAT, "version": 1, "model": embedder.record(), "hnsw_threshold": int(hnsw_threshold),
                  "hnsw_m": HNSW_M, "ef_search": EF_SEARCH, "roots": {scan.root: scan.layout},
                  "people": {"threshold": threshold, "source": source}}  # fmt: skip
        live = _live(folder)
        if live:  # --force: a new version of the same folder
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                record["version"] = int(json.loads((folder / live / RECORD).read_text())["version"]) + 1
        graph = search_graph(embeddings, record, None, appended=False)
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    _log_skips(scan.skips + batch.skips)
    _log_notes(photo_table, notes)
    without = Counter(r[REASON] for r in batch.photo_rows if r[REASON] is not None)
    return _report(faces, photo_table, added_faces=len(faces), added_photos=int((photo_table[N_FACES] > 0).sum()),
                   without_faces=without, person_notes=Counter(notes.values()), skips=scan.skips + batch.skips,
                   version=version)  # fmt: skip


def add(index_dir: str | os.PathLike, photo_dir: str, layout: str = AUTO, model: str | None = None,
        device: str = "cpu", limits: CropLimits = LIMITS, prune: bool = False) -> Report:  # fmt: skip
    """Bring the index up to date with the photos under ``photo_dir`` (see the module doc).

    New content is embedded; content changed at an indexed path replaces the old; an
    indexed content at a new path, whose old path no longer holds it, is moved; indexed
    photos under ``photo_dir`` whose file is gone are reported, and dropped with ``prune``.
    """
    folder = Path(index_dir)
    with writing(folder):
        clean_stale(folder)
        old = load_index(folder)
        embedder = old.embedder(model, device)  # the same model: a new --model path is recorded as its place
        threshold, source = old.enrol_threshold(embedder)
        scan = _scan(photo_dir, layout, folder, old.roots())
        batch = embed_files(scan.files, scan.root, embedder, limits, known=frozenset(old.photos[SHA256]))
        change, gone = _follow(old, scan, batch, limits)
        replaced = len(change.drop)
        if prune:
            change.drop |= set(gone)
        skips = [s for s in scan.skips + batch.skips
                 if not (s.reason == ALREADY_INDEXED and batch.hashed.get(s.photo) in change.moves
                         and change.moves[batch.hashed[s.photo]][1] == s.photo)]  # fmt: skip
        _log_skips(skips)
        gone_paths = sorted(gone.values())
        without = Counter(r[REASON] for r in batch.photo_rows if r[REASON] is not None)
        if change.empty():
            return _report(old.faces, old.photos, skips=skips, gone=gone_paths)
        faces, photo_table, embeddings, notes = _apply(old, change, threshold)
        roots = old.roots()
        roots.setdefault(scan.root, scan.layout)
        record = old.record | {"version": old.record["version"] + 1, "model": embedder.record(), "roots": roots,
                               "people": {"threshold": threshold, "source": source}}  # fmt: skip
        appended = not change.drop  # moves and names change no embedding row: the graph takes the new rows
        graph = search_graph(embeddings, record, old, appended=appended)
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    _log_notes(photo_table, notes)
    new_photos = [r for r in batch.photo_rows if r[N_FACES] > 0]
    return _report(faces, photo_table, added_faces=len(batch.face_rows), added_photos=len(new_photos),
                   replaced_photos=replaced, moved_photos=len(change.moves), without_faces=without,
                   person_notes=Counter(notes.values()), skips=skips, gone=gone_paths, pruned=prune,
                   version=version)  # fmt: skip


def _follow(old: PhotoIndex, scan: Scan, batch: Batch, limits: CropLimits) -> tuple[_Change, dict[str, str]]:
    """What ``add`` changes: new content, moved and replaced photos; and {sha: path} of the gone ones."""
    places = _places(old)
    path_of = {sha: _join(*place) for sha, place in places.items()}
    person_of = {f.rel: f.person for f in scan.files}
    now = {_join(scan.root, rel): sha for rel, sha in batch.hashed.items()}  # what the scan read where
    change = _Change(batch=batch)
    for rel, sha in batch.hashed.items():
        here = _join(scan.root, rel)
        if sha not in path_of or path_of[sha] == here or sha in change.moves:
            continue
        before = path_of[sha]
        # Does the old path still hold it (then this is a copy)? Read there unless the scan read it.
        still = now[before] if before in now else _content(photo_path(*places[sha]), limits)
        if still != sha:  # the indexed content left its path and is here now
            change.moves[sha] = (scan.root, rel, person_of[rel])
    # A path the scan read other content at (new, moved in, or a copy of another indexed photo) no longer
    # holds what was indexed there: that photo goes, unless it moved. A path it could not read is left as is.
    change.drop = {sha for sha, path in path_of.items() if now.get(path, sha) != sha and sha not in change.moves}
    gone = {}
    for sha, path in path_of.items():
        rel = _rel_under(path, scan.root)
        if (sha not in change.moves and sha not in change.drop and _rel_under(path, scan.folder) is not None
                and rel not in scan.listed):  # fmt: skip
            gone[sha] = path
    return change, gone


def _targets(index: PhotoIndex, targets: Sequence[str], limits: CropLimits) -> tuple[np.ndarray, list[str]]:
    """(photos rows to remove, targets that matched none): by path (file or folder) or by a file's content.

    A path is resolved (:func:`resolve`: relative to the current folder) and means the photo
    at that path, or every photo under that folder, whichever root holds it.
    """
    p = index.photos
    roots, rels = p[ROOT].to_numpy(), p[PHOTO].astype(object).to_numpy()
    hit = np.zeros(len(p), bool)
    unmatched = []
    for target in targets:
        resolved = resolve(target)
        mine = np.zeros(len(p), bool)
        for root in set(roots):
            rel = _stored_rel(resolved, root)
            if rel is not None:  # the photo at rel under this root, or every photo under the folder rel
                mine |= (roots == root) & np.array([not rel or r == rel or r.startswith(rel + "/") for r in rels])
        if os.path.isfile(target):
            with contextlib.suppress(ImageRejected):
                mine |= (p[SHA256] == read_file(target, limits)[1]).to_numpy()
        if not mine.any():
            unmatched.append(target)
        hit |= mine
    return hit, unmatched


def remove(index_dir: str | os.PathLike, targets: Sequence[str] = (), limits: CropLimits = LIMITS,
           missing: bool = False) -> Report:  # fmt: skip
    """Remove the photos ``targets`` name (see :func:`_targets`) and their faces.

    ``missing``: also every photo whose file no longer holds the indexed content
    (:func:`check_files`); one found at a new path under the index's roots is moved there
    instead. Nobody else's name changes.
    """
    folder = Path(index_dir)
    with writing(folder):
        clean_stale(folder)
        old = load_index(folder)
        hit, unmatched = _targets(old, targets, limits)
        change = _Change(drop=set(old.photos.loc[hit, SHA256]))
        if missing:
            check = check_files(old, limits)
            sha_at = {_join(*place): sha for sha, place in _places(old).items()}
            change.drop |= {sha_at[path] for path in check.missing + check.changed}
            roots = old.roots()
            change.moves = {sha: (root, rel, _person_at(rel, roots[root])) for sha, (root, rel) in check.moved.items()
                            if sha not in change.drop}  # fmt: skip
        if change.empty():
            return _report(old.faces, old.photos, unmatched=unmatched)
        # Only a photo moved into another person's folder is enrolled again, at the index's threshold.
        threshold = old.enrol_threshold()[0] if change.moves else 0.0
        faces, photo_table, embeddings, notes = _apply(old, change, threshold)
        record = old.record | {"version": old.record["version"] + 1}
        graph = search_graph(embeddings, record, old, appended=not change.drop)  # HNSW cannot delete: rebuilt
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    _log_notes(photo_table, notes)
    return _report(faces, photo_table, removed_photos=len(change.drop), moved_photos=len(change.moves),
                   person_notes=Counter(notes.values()), unmatched=unmatched, version=version)  # fmt: skip


def info(index_dir: str | os.PathLike, check: bool = False, limits: CropLimits = LIMITS) -> dict:
    """People, faces, photos, the model (and whether its file is still the same model), the threshold.

    ``check``: also :func:`check_files` (reads every indexed photo), under ``"check"``.
    """
    index = load_index(index_dir)
    own = index.record["model"]
    model: dict = {k: own[k] for k in ("path", "backbone", "fingerprint", "embedding_dim")}
    model["problem"] = None
    threshold = None
    try:
        embedder = Embedder.load(own["path"])
        model["file_matches"] = embedder.fingerprint == own["fingerprint"]
        if model["file_matches"]:
            threshold = verdict_record(verdict(embedder.payload, len(index.faces)))
    except PhotoIndexError as exc:
        model["file_matches"], model["problem"] = None, str(exc)  # the file is gone, or no model
    p, f = index.photos, index.faces
    people = sorted(f[PERSON].dropna().unique())
    named_photos = set(f.loc[f[PERSON].notna(), SHA256])
    unnamed = int((p[PERSON].notna() & (p[N_FACES] > 0) & ~p[SHA256].isin(named_photos)).sum())
    out = {
        "index": str(index.folder), "version": index.version, "faces": len(f),
        "photos": int((p[N_FACES] > 0).sum()), "photos_without_faces": dict(Counter(p[REASON].dropna())),
        "people": len(people), "names": people, "person_not_found": unnamed, "roots": index.roots(),
        "model": model, "threshold": threshold,
        "search": {"structure": index.record["structure"], "hnsw_threshold": index.record["hnsw_threshold"]},
    }  # fmt: skip
    if check:
        out["check"] = check_files(index, limits).as_dict()
    return out


def info_lines(d: dict) -> list[str]:
    m, t = d["model"], d["threshold"]
    state = {True: "", False: " (the file there is now another model!)", None: f" ({m.get('problem')})"}
    names = ", ".join(d["names"][:10]) + (", ..." if len(d["names"]) > 10 else "")
    without = _counts(Counter(d["photos_without_faces"]))
    out = [
        f"index: {d['index']} (version {d['version']})",
        f"people: {d['people']}" + (f" ({names})" if names else ""),
        f"faces: {d['faces']}",
        f"photos: {d['photos']} with faces" + (f"; without: {without}" if without else "")
        + (f"; in a person's folder without that person: {d['person_not_found']}" if d["person_not_found"] else ""),
        "roots: " + ", ".join(f"{r} ({layout})" for r, layout in d["roots"].items()),
        f"model: {m['backbone']} {m['path']}{state[m['file_matches']]}, fingerprint {m['fingerprint'][:12]}",
        "threshold: " + (f"{t['similarity']:.4f} ({t['source']})" if t else "unknown (the model file is not usable)"),
        *([t["meaning"]] + ([t["warning"]] if t["warning"] else []) if t else []),
        f"search: {d['search']['structure']} (HNSW from {d['search']['hnsw_threshold']} faces)",
    ]  # fmt: skip
    c = d.get("check")
    if c is not None:
        if not (c["missing"] or c["changed"] or c["unreadable"] or c["moved"]):
            out.append(f"check: all {c['checked']} photos are where they were indexed, unchanged")
        for key, what in (("missing", "gone"), ("changed", "content changed"), ("unreadable", "cannot be read")):
            out += [f"check: {what}: {path}" for path in c[key]]
        out += [f"check: moved: {m['from']} -> {m['to']}" for m in c["moved"]]
        if c["missing"] or c["changed"] or c["moved"]:
            out.append("check: index add --photos FOLDER re-embeds changed and follows moved photos; "
                       "index remove --missing drops the gone ones (and follows the moved)")  # fmt: skip
    return out


def group_by_person(persons: Sequence[str | None], top: int, also: int = ALSO) -> list[list[int]]:
    """Ranked faces grouped into at most ``top`` entries, one a person: the app's and ``search``'s grouping.

    ``persons``: the person of each candidate face, best first (None: unnamed). Returns
    entries in rank order, each a list of positions into ``persons``: the entry's best
    face, then up to ``also`` more faces of the same person, in rank order. An unnamed
    face is an entry of its own. Fewer than ``top`` entries when the candidates run out.
    """
    entries: list[list[int]] = []
    where: dict[str, int] = {}
    for pos, person in enumerate(persons):
        if person is None or pd.isna(person):
            if len(entries) < top:
                entries.append([pos])
        elif person in where:
            entry = entries[where[person]]
            if len(entry) <= also:
                entry.append(pos)
        elif len(entries) < top:
            where[person] = len(entries)
            entries.append([pos])
    return entries


def _query_faces(query: str, embedder: Embedder, limits: CropLimits) -> tuple[str | None, str | None, tuple, object]:
    """(None, None, boxes, crops) of a query photo's faces; (verdict, reason, (), None) when it cannot be searched."""
    try:
        _, boxes, crops, _ = file_faces(read_file(query, limits)[0], embedder.settings, limits)
    except ImageRejected as exc:
        if exc.reason == Reason.NOT_A_FILE and not os.path.exists(query):
            return MISSING, str(exc.reason), (), None
        shape = exc.reason in (Reason.TOO_SMALL, Reason.BAD_ASPECT)  # a photo, but nothing to search in it
        return (NO_FACE if shape else UNREADABLE), str(exc.reason), (), None
    except Exception as exc:  # a hostile query photo gets its line, like any other
        log.warning("%s: unexpected %s: %s", query, type(exc).__name__, exc)
        return UNREADABLE, Reason.ERROR.value, (), None
    if not boxes:
        return NO_FACE, Reason.NO_FACE.value, (), None
    return None, None, boxes, crops


def search(index_dir: str | os.PathLike, queries: Sequence[str], top: int = 9, threshold: float | None = None,
           model: str | None = None, limits: CropLimits = LIMITS, also: int = ALSO,
           fpir: float | None = None) -> Iterator[dict]:  # fmt: skip
    """For each face of each query photo, the JSON-line object described in the module doc."""
    if top < 1:
        raise PhotoIndexError(f"--top must be at least 1, not {top}")
    if also < 0:
        raise PhotoIndexError(f"--also must be at least 0, not {also}")
    index = load_index(index_dir)
    embedder = index.embedder(model)
    if fpir is not None and not 0 < fpir < 1:
        raise PhotoIndexError(f"--fpir must lie strictly between 0 and 1, not {fpir}")
    answer = verdict(embedder.payload, len(index.faces), threshold, fpir=fpir)
    cut = answer.similarity
    log.info("%s", answer.meaning())
    if answer.warning():
        log.warning("%s", answer.warning())
    structure = index.structure()
    f = index.faces
    persons = [None if pd.isna(x) else str(x) for x in f[PERSON]]
    statuses: dict[tuple[str, str], str] = {}  # each shown photo read once a command

    def shown(i: int, similarity: float) -> dict:
        key = (str(f.at[i, ROOT]), str(f.at[i, PHOTO]))
        if key not in statuses:
            statuses[key] = source_status(photo_path(*key), str(f.at[i, SHA256]), limits)
        return {"similarity": round(float(similarity), 6), "photo": _join(*key), "box": _box(f, i),
                "photo_status": statuses[key]}  # fmt: skip

    for query in queries:
        failure, reason, boxes, crops = _query_faces(query, embedder, limits)
        if failure is not None:
            yield {"photo": query, "box": None, "verdict": failure, "person": None, "reason": reason, "results": []}
            continue
        found = _candidates(structure, embedder.embed(crops), persons, top, also)
        for box, (sims, ix) in zip(boxes, found, strict=True):
            groups = group_by_person([persons[i] for i in ix], top, also)
            results = [{"rank": rank, "person": persons[ix[g[0]]], **shown(ix[g[0]], sims[g[0]]),
                        "also": [shown(ix[j], sims[j]) for j in g[1:]]}
                       for rank, g in enumerate(groups, start=1)]  # fmt: skip
            best = float(sims[0]) if len(sims) else None
            # "match" at similarity >= threshold: facesearch.verification's acceptance rule.
            matched = best is not None and best >= cut
            yield {"photo": query, "box": list(box), "verdict": "match" if matched else "no_match",
                   "person": results[0]["person"] if matched else "unknown",
                   "similarity": None if best is None else round(best, 6), "threshold": round(float(cut), 6),
                   "results": results}  # fmt: skip


def _candidates(structure: CheckedIndex | None, emb: np.ndarray, persons: list, top: int,
                also: int) -> list[tuple[np.ndarray, list[int]]]:  # fmt: skip
    """Per face: (similarities, face rows), best first, with enough candidates for ``top`` entries.

    Starts at ``top * (also + 1)`` faces and takes four times more while a face's candidates
    hold fewer than ``top`` entries (one person's many photos) and the index has more.
    """
    n = len(persons)
    if structure is None:
        return [(np.zeros(0), []) for _ in range(len(emb))]
    k = min(n, top * (also + 1))
    while True:
        dist, idx = structure.search(emb, k)
        short = any(len(group_by_person([persons[i] for i in row], top, 0)) < top for row in idx)
        if not short or k >= n:
            break
        k = min(n, k * 4)
    return [(cosine_similarity(d), ix.tolist()) for d, ix in zip(dist, idx, strict=True)]


def verdict_record(v: Verdict) -> dict:
    """A verdict as ``index info --json`` and ``search --json`` report it."""
    return {"similarity": v.similarity, "source": v.source, "fpir": v.fpir, "gallery_faces": v.gallery_faces,
            "calibrated_on": v.calibrated_on, "synthetic": v.synthetic, "meaning": v.meaning(),
            "warning": v.warning()}  # fmt: skip


def _box(faces: pd.DataFrame, i: int) -> list[int]:
    return [int(faces.at[i, c]) for c in (BOX_X, BOX_Y, BOX_W, BOX_H)]


_STALE = {CHANGED: "  [photo changed since indexed: not shown]", MISSING: "  [photo gone]",
          UNREADABLE: "  [photo unreadable]", CURRENT: ""}  # fmt: skip


def result_lines(line: dict) -> list[str]:
    if line["box"] is None:
        what = {MISSING: "no such file", UNREADABLE: "cannot be read as a photo", NO_FACE: "no usable face"}
        return [f"{line['photo']}: {what.get(line['verdict'], line['verdict'])} ({line['reason']})"]
    if line["verdict"] == "match":
        who = line["person"] if line["person"] is not None else "an unnamed face"
        head = f"match: {who} (similarity {line['similarity']:.3f} >= threshold {line['threshold']:.3f})"
    elif line["similarity"] is None:
        head = "no match: unknown (the index holds no faces)"
    else:
        head = f"no match: unknown (best similarity {line['similarity']:.3f} < threshold {line['threshold']:.3f})"
    out = [f"{line['photo']} face at {line['box']}: {head}"]
    for r in line["results"]:
        who = r["person"] if r["person"] is not None else "(unnamed face)"
        stale = _STALE[r["photo_status"]]
        out.append(f"  {r['rank']:>3}  {r['similarity']:.3f}  {who}  {r['photo']}  {r['box']}{stale}")
        for a in r["also"]:
            out.append(f"       {a['similarity']:.3f}  also {a['photo']}  {a['box']}{_STALE[a['photo_status']]}")
    return out


# --- the command line ------------------------------------------------------------------------
def add_parsers(sub) -> None:
    """Register ``index`` (build, add, remove, info) and ``search`` on the ``python -m facesearch`` parser."""
    idx = sub.add_parser("index", help="index every face of your photos (build, add, remove, info)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cmds = idx.add_subparsers(dest="index_command", required=True)
    b = cmds.add_parser("build", help="index every face of every photo under a folder")
    b.add_argument("--model", required=True, help="a trained model, e.g. models/resnet50.pt")
    b.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    b.add_argument("--out", required=True, help="index folder to create")
    b.add_argument("--hnsw-threshold", type=int, default=DEFAULT_HNSW_THRESHOLD,
                   help="search with FAISS HNSW from this many faces on (default %(default)s)")  # fmt: skip
    b.add_argument("--force", action="store_true", help="replace an existing index at --out")
    a = cmds.add_parser("add", help="add the photos under a folder the index has not seen, follow moved and changed "
                                    "ones")  # fmt: skip
    a.add_argument("--index", required=True)
    a.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    a.add_argument("--model", default=None, help="the index's model, if it moved (another model is refused)")
    a.add_argument("--prune", action="store_true", help="drop indexed photos under --photos whose file is gone")
    for p in (b, a):
        p.add_argument("--layout", choices=GALLERY_LAYOUTS, default=AUTO,
                       help="folders: <photos>/<person>/*.jpg names people; plain: no names; auto: folders when "
                            "every photo is one folder deep (add inside an indexed root: that root's)")  # fmt: skip
        p.add_argument("--device", default="cpu", help="where to embed (cpu, cuda, auto)")
    r = cmds.add_parser("remove", help="remove photos by path (file or folder) or by the content of a file")
    r.add_argument("--index", required=True)
    r.add_argument("--photos", nargs="+", default=[], metavar="PATH",
                   help="a photo or folder (relative: from the current folder), or a file with a photo's "
                        "content")  # fmt: skip
    r.add_argument("--missing", action="store_true",
                   help="also every photo whose file is gone or changed (moved ones are followed)")  # fmt: skip
    i = cmds.add_parser("info", help="people, faces, photos, model and threshold of an index")
    i.add_argument("--index", required=True)
    i.add_argument("--json", action="store_true")
    i.add_argument("--check", action="store_true",
                   help="read every indexed photo: report gone, changed and moved ones (exit 1 if any)")  # fmt: skip
    s = sub.add_parser("search", help="find the people in photos in an index")
    s.add_argument("--index", required=True)
    s.add_argument("photos", nargs="+", metavar="PHOTO")
    s.add_argument("--top", type=int, default=9, help="people (or unnamed faces) per face (default %(default)s)")
    s.add_argument("--also", type=int, default=ALSO, help="more faces of a person listed under them (default "
                                                          "%(default)s)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="one JSON object per line and face")
    s.add_argument("--threshold", type=float, default=None, help="similarity for a match (default: the model's)")
    s.add_argument("--fpir", type=float, default=None, help="false matches per search for someone not in the index "
                   "to allow, instead of the model's calibrated target (e.g. 0.001: stricter)")  # fmt: skip
    s.add_argument("--model", default=None, help="the index's model, if it moved (another model is refused)")


# The expected failures of an index command: each is one line and a non-zero exit, never a traceback.
EXPECTED = (PhotoIndexError, ModelFileError, SchemaError, DatasetError, OSError)


def main(args: argparse.Namespace) -> None:
    name = " ".join(x for x in (args.command, getattr(args, "index_command", None)) if x)
    try:
        code = _run(args)
    except EXPECTED as exc:
        raise SystemExit(f"{name}: {' '.join(str(exc).split())}") from None
    if code:
        raise SystemExit(code)


def _run(args: argparse.Namespace) -> int:
    if args.command == "search":
        failed: Counter = Counter()
        for line in search(
            args.index, args.photos, args.top, args.threshold, args.model, also=args.also, fpir=args.fpir
        ):
            print(json.dumps(line) if args.json else "\n".join(result_lines(line)), flush=True)
            if line["box"] is None:
                failed[line["verdict"]] += 1
        if failed and sum(failed.values()) == len(args.photos):
            print(f"search: nothing could be searched ({_counts(failed)})", file=sys.stderr)
            return 2
        return 0
    cmd = args.index_command
    if cmd == "info":
        d = info(args.index, check=args.check)
        print(json.dumps(d) if args.json else "\n".join(info_lines(d)))
        c = d.get("check")
        return int(bool(c and (c["missing"] or c["changed"] or c["unreadable"] or c["moved"])))
    if cmd == "build":
        report = build(args.model, args.photos, args.out, args.layout, args.hnsw_threshold, args.force, args.device)
    elif cmd == "add":
        report = add(args.index, args.photos, args.layout, args.model, args.device, prune=args.prune)
    else:
        if not args.photos and not args.missing:
            raise PhotoIndexError("name photos to remove (--photos PATH ...), or --missing")
        report = remove(args.index, args.photos, missing=args.missing)
    print("\n".join(report.lines()))
    return int(cmd == "remove" and bool(report.unmatched) and not report.removed_photos)
