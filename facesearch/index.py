"""Search your own photos: ``python -m facesearch index build|add|remove|info`` and ``search``.

    python -m facesearch index build --model models/resnet50.pt --photos ~/Pictures --out photos.index
    python -m facesearch index add --index photos.index --photos ~/Pictures/2025
    python -m facesearch index remove --index photos.index --photos ~/Pictures/2025/blurry.jpg
    python -m facesearch index info --index photos.index
    python -m facesearch search --index photos.index me.jpg [more.jpg ...] [--top 9] [--json]

``build`` indexes *every* face of every photo under ``--photos`` (recursively,
files in sorted order), found and cut with the model's own preprocessing
(``payload["preprocessing"]``, :func:`facesearch.contract.model_preprocessing`)
and embedded by :mod:`facesearch.photos`, the code the app uses. A file that is
not a usable photo (hidden, not a regular file, not an image, truncated, a
decompression bomb, too small, no face ...) is a counted skip with its reason,
never a crash. Each content (SHA-256 of the file's bytes) is indexed once.

People: with ``--layout folders`` (one folder per person, ``<photos>/<person>/*.jpg``)
each face is named after its photo's folder; ``plain`` names nobody; ``auto``
(the default) is ``folders`` when every photo sits exactly one folder below
the root, else ``plain``. Under ``folders`` a photo outside a person folder is
skipped (``not_in_a_person_folder``).

``add`` embeds only photos whose content the index has not seen (a photo whose
content changed at a path already indexed replaces the old one); ``remove``
drops photos named by path (a file or a folder, as given to build/add, or as
stored) or by the content of a given file. Both refuse a model other than the
index's, which the index identifies by its fingerprint (SHA-256 of the
model's config, preprocessing record and weights): embeddings of two models
cannot be compared.

``search`` answers, for each face of each query photo, the ``--top`` most
similar indexed faces (cosine similarity of L2-normalised embeddings) and a
verdict: ``match`` when the best similarity reaches the model's threshold for a
gallery of this index's size (:func:`facesearch.contract.verdict`: calibrated so
that a search for someone not in the index matches at most at the model's target
FPIR, see :mod:`facesearch.verification`), else ``no_match``. A model without a
calibration gets :data:`facesearch.contract.FALLBACK_THRESHOLD` and a warning;
``--threshold`` overrides either. With ``--json``, one line per face::

    {"photo": "me.jpg", "box": [x, y, w, h], "verdict": "match" | "no_match",
     "results": [{"rank": 1, "similarity": 0.91, "photo": "/abs/alice/1.jpg", "box": [...], "name": "alice"}, ...]}

and a photo without a usable face gets one line with ``"box": null``, a
``"reason"`` and no results. Boxes are in the photo's own pixels (after EXIF
orientation).

The index is a folder::

    INDEX/CURRENT             the name of the live version (one line), replaced atomically
    INDEX/v000003-<hex>/      a version, never modified once CURRENT names it
        embeddings.npy        (faces, d) float32, L2-normalised; row i <-> faces.parquet row i
        faces.parquet         FACE_DTYPES: photo, content hash, face number, box, name
        photos.parquet        PHOTO_DTYPES: every photo read (those without faces too, with why)
        index.json            format, version, the model (path, fingerprint, preprocessing), search settings
        hnsw.faiss            the HNSW graph (faiss.write_index), present when faces >= hnsw_threshold

``add`` and ``remove`` write a whole new version beside the live one, then
replace ``CURRENT`` (``os.replace``): killed at any point, the index is the old
version, complete; an unreferenced half-written version is deleted by the next
write. The version before the live one is kept, so a search that read
``CURRENT`` just before a switch still finds its files. Writers take an
exclusive lock (``INDEX/.lock``); readers take none.

Search structure: exact brute force (:class:`facesearch.search.ExactIndex`)
below ``hnsw_threshold`` faces, FAISS HNSW (approximate) from there on. At
100k faces exact search takes ~1.2 ms a query on a 2-core CPU and HNSW ~0.4 ms
at recall@10 ~0.91 (``bench/index.py``), so the default keeps search exact up
to a million faces. ``add`` inserts the new faces into the stored graph;
``remove`` rebuilds it (HNSW cannot delete).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
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

from facesearch import manifest as M
from facesearch import photos
from facesearch.celeba import DatasetError
from facesearch.contract import Verdict, model_preprocessing, preprocessing_record, verdict
from facesearch.cropping import CropLimits, read_photo, shape_reason
from facesearch.faces import FaceConfig
from facesearch.images import ImageRejected, decode_image
from facesearch.io import normal_permissions, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from facesearch.layouts import GALLERY_LAYOUTS, PhotoFile, Skip, assign_people, list_photo_files
from facesearch.manifest import Reason, SchemaError
from facesearch.manifest import _check_columns as check_columns  # the manifest's column and dtype check
from facesearch.models import load_model, resolve_device
from facesearch.search import CheckedIndex, FaissIndex, build_index, cosine_similarity

log = logging.getLogger("facesearch.index")

FORMAT = 1  # index.json "format": bumped when the folder's layout changes
POINTER = "CURRENT"
LOCK = ".lock"
EMBEDDINGS, FACES, PHOTOS = "embeddings.npy", "faces.parquet", "photos.parquet"
RECORD, GRAPH = "index.json", "hnsw.faiss"
# Faces from which the index searches with HNSW instead of exactly. Exact search grows linearly,
# ~1.2 ms a query at 100k faces on a 2-core CPU (bench/index.py), so ~12 ms at a million: still
# instant next to loading the index, and exact. HNSW is only ~3x faster at 100k and misses ~9% of
# the true top 10; it pays off beyond a million faces.
DEFAULT_HNSW_THRESHOLD = 1_000_000
HNSW_M, EF_SEARCH = 32, 64  # FaissIndex's defaults: graph links per node, candidates explored per search
EMBED_BATCH = 256  # crops gathered across photos before a forward pass (~36 MB at 218 px)
# The crop stage's file and image limits (crop.max_file_bytes, max_pixels, min_image_side, max_aspect).
LIMITS = CropLimits()

# Skip reasons that are not a photo's own (manifest Reason values are the rest).
DUPLICATE = "duplicate"  # the same bytes as an earlier file of this run
ALREADY_INDEXED = "already_indexed"  # add: the index holds this content already

# --- the tables ----------------------------------------------------------------------------
ROOT = "root"  # absolute folder given to build/add
PHOTO = "photo"  # path relative to root, "/"-separated (each part a facesearch.celeba.storable_name)
SHA256 = M.SHA256  # content hash of the photo file's bytes
PERSON = "person"  # the person folder's name under layout folders; null otherwise
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
    if p.duplicated([ROOT, PHOTO]).any():
        raise SchemaError("photos: a path is indexed twice")
    if not all(os.path.isabs(r) for r in p[ROOT]):
        raise SchemaError("photos: root must be an absolute path")
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
    for col in (ROOT, PHOTO, PERSON):
        if not joined[col].fillna("\0").equals(joined[f"{col}_photo"].fillna("\0")):
            raise SchemaError(f"faces: {col} disagrees with the photo's row")


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
        if not Path(path).is_file():
            raise PhotoIndexError(f"model file {path} does not exist")
        model, payload = load_model(path)  # on the CPU: the fingerprint reads the weights there
        dev = resolve_device(device)
        settings, size = model_preprocessing(payload)
        return cls(os.path.abspath(path), model.to(dev), payload, settings, size, model_fingerprint(payload), dev)

    def record(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "backbone": self.model.config.backbone,
                "embedding_dim": self.model.config.embedding_dim,
                "preprocessing": preprocessing_record(self.settings, self.size)}  # fmt: skip

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return unit(photos.embed(self.model, crops, self.size, self.device))


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, float32 (a model saved with normalize false has longer ones)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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


@dataclass
class Batch:
    """What embedding a list of photo files produced: rows for both tables, embeddings, skips."""

    photo_rows: list[dict] = field(default_factory=list)
    face_rows: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

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
    skip, retried by the next ``add``.
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
    if not name or "/" in name or not (folder / name).is_dir():
        raise PhotoIndexError(f"{folder}/{POINTER} names {name!r}, which is not a version of this index")
    return name


def load_index(folder: str | os.PathLike) -> PhotoIndex:
    """The live version of the index in ``folder``, checked."""
    folder = Path(folder)
    name = _read_pointer(folder)
    vdir = folder / name
    record = json.loads((vdir / RECORD).read_text())
    if record.get("format") != FORMAT:
        raise PhotoIndexError(f"{folder}: index format {record.get('format')}, this version reads {FORMAT}")
    embeddings = np.load(vdir / EMBEDDINGS)
    faces, photo_table = pd.read_parquet(vdir / FACES), pd.read_parquet(vdir / PHOTOS)
    validate_index(faces, photo_table, embeddings, int(record["model"]["embedding_dim"]))
    graph = None
    if record["structure"] == "hnsw":
        import faiss

        graph = faiss.read_index(str(vdir / GRAPH))
        if graph.ntotal != len(faces):
            raise SchemaError(f"{vdir / GRAPH}: {graph.ntotal} vectors for {len(faces)} faces")
    return PhotoIndex(folder, name, record, embeddings, faces, photo_table, graph)


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

    Caller holds :func:`writing`. Returns the new version's name.
    """
    validate_index(faces, photo_table, embeddings, int(record["model"]["embedding_dim"]))
    record = record | {"structure": "exact" if graph is None else "hnsw", "faces": len(faces)}
    name = f"v{record['version']:06d}-{secrets.token_hex(4)}"
    vdir = folder / name
    vdir.mkdir()  # invisible until CURRENT names it
    normal_permissions(vdir, directory=True)
    np.save(vdir / EMBEDDINGS, embeddings)
    normal_permissions(vdir / EMBEDDINGS)
    write_parquet_atomic(vdir / FACES, faces)
    write_parquet_atomic(vdir / PHOTOS, photo_table)
    if graph is not None:
        import faiss

        faiss.write_index(graph, str(vdir / GRAPH))
        normal_permissions(vdir / GRAPH)
    write_json_atomic(vdir / RECORD, record)
    previous = (folder / POINTER).read_text().strip() if (folder / POINTER).is_file() else None
    write_bytes_atomic(folder / POINTER, (name + "\n").encode())
    # Keep the live version and the one before it (a reader may still be opening it); the rest,
    # finished or killed half-way, goes.
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name.startswith("v") and entry.name not in (name, previous):
            shutil.rmtree(entry, ignore_errors=True)
    return name


# --- the commands ----------------------------------------------------------------------------
@dataclass
class Report:
    """What a build/add/remove did, for the user."""

    faces: int  # in the index now
    photos: int  # photos with at least one indexed face, now
    people: int
    added_faces: int = 0
    added_photos: int = 0
    removed_photos: int = 0
    without_faces: Counter = field(default_factory=Counter)  # reason -> photos read that gave no face, this run
    skips: list[Skip] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # remove: targets that matched nothing
    version: str | None = None  # the version written; None when nothing changed

    def lines(self) -> list[str]:
        out = [f"index: {self.faces} faces in {self.photos} photos, {self.people} people"
               + (f" (version {self.version})" if self.version else " (unchanged)")]  # fmt: skip
        if self.added_photos or self.added_faces:
            out.append(f"added: {self.added_faces} faces from {self.added_photos} photos")
        if self.removed_photos:
            out.append(f"removed: {self.removed_photos} photos")
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


def _scan(photo_dir: str, layout: str, index_dir: Path) -> tuple[str, list[PhotoFile], list[Skip]]:
    root = os.path.abspath(photo_dir)
    try:
        files, skips = list_photo_files(root, exclude=[index_dir])
        files, outside, used = assign_people(files, layout)
    except DatasetError as exc:
        raise PhotoIndexError(str(exc)) from None
    log.info("%s: %d files, layout %s", root, len(files), used)
    return root, files, skips + outside


def build(
    model: str, photo_dir: str, out: str | os.PathLike, layout: str = "auto",
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD, force: bool = False, device: str = "cpu",
    limits: CropLimits = LIMITS,
) -> Report:  # fmt: skip
    """Index every face of every photo under ``photo_dir`` with ``model`` into the folder ``out``."""
    folder = Path(out)
    # A folder holding only a lock and version folders is a build killed before its first CURRENT.
    if (
        folder.exists()
        and not (folder / POINTER).is_file()
        and any(p.name != LOCK and not (p.is_dir() and p.name.startswith("v")) for p in folder.iterdir())
    ):
        raise PhotoIndexError(f"{folder} exists and is not a photo index; choose a new folder")
    if (folder / POINTER).is_file() and not force:
        raise PhotoIndexError(f"{folder} is an index already: add photos with index add, or rebuild with --force")
    if hnsw_threshold < 1:
        raise PhotoIndexError(f"--hnsw-threshold must be at least 1, not {hnsw_threshold}")
    embedder = Embedder.load(model, device)
    root, files, skips = _scan(photo_dir, layout, folder)
    with writing(folder):
        batch = embed_files(files, root, embedder, limits)
        faces, photo_table = _table(batch.face_rows, FACE_DTYPES), _table(batch.photo_rows, PHOTO_DTYPES)
        embeddings = batch.vectors(embedder.model.config.embedding_dim)
        record = {"format": FORMAT, "version": 1, "model": embedder.record(), "hnsw_threshold": int(hnsw_threshold),
                  "hnsw_m": HNSW_M, "ef_search": EF_SEARCH}  # fmt: skip
        if folder.joinpath(POINTER).is_file():  # --force: a new version of the same folder
            record["version"] = json.loads((folder / _read_pointer(folder) / RECORD).read_text())["version"] + 1
        graph = search_graph(embeddings, record, None, appended=False)
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    skips = skips + batch.skips
    _log_skips(skips)
    without = Counter(r[REASON] for r in batch.photo_rows if r[REASON] is not None)
    return _report(faces, photo_table, added_faces=len(faces), added_photos=int((photo_table[N_FACES] > 0).sum()),
                   without_faces=without, skips=skips, version=version)  # fmt: skip


def add(index_dir: str | os.PathLike, photo_dir: str, layout: str = "auto", model: str | None = None,
        device: str = "cpu", limits: CropLimits = LIMITS) -> Report:  # fmt: skip
    """Embed the photos under ``photo_dir`` whose content the index has not seen, and add them."""
    folder = Path(index_dir)
    with writing(folder):
        old = load_index(folder)
        embedder = old.embedder(model, device)  # the same model: a new --model path is recorded as its place
        root, files, skips = _scan(photo_dir, layout, folder)
        batch = embed_files(files, root, embedder, limits, known=frozenset(old.photos[SHA256]))
        skips = skips + batch.skips
        _log_skips(skips)
        without = Counter(r[REASON] for r in batch.photo_rows if r[REASON] is not None)
        if not batch.photo_rows:
            return _report(old.faces, old.photos, skips=skips)
        new_photos = _table(batch.photo_rows, PHOTO_DTYPES)
        # A path indexed before with other content (an edited photo): the new content replaces it.
        keys = pd.MultiIndex.from_frame(new_photos[[ROOT, PHOTO]])
        replaced = set(old.photos.loc[pd.MultiIndex.from_frame(old.photos[[ROOT, PHOTO]]).isin(keys), SHA256])
        keep = ~old.faces[SHA256].isin(replaced).to_numpy()
        faces = pd.concat([old.faces[keep], _table(batch.face_rows, FACE_DTYPES)], ignore_index=True)
        photo_table = pd.concat([old.photos[~old.photos[SHA256].isin(replaced)], new_photos], ignore_index=True)
        embeddings = np.concatenate([old.embeddings[keep], batch.vectors(old.dim)])
        record = old.record | {"version": old.record["version"] + 1, "model": embedder.record()}
        graph = search_graph(embeddings, record, old, appended=bool(keep.all()))
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    return _report(faces, photo_table, added_faces=len(batch.face_rows), removed_photos=len(replaced),
                   added_photos=int((new_photos[N_FACES] > 0).sum()), without_faces=without, skips=skips,
                   version=version)  # fmt: skip


def _targets(index: PhotoIndex, targets: Sequence[str], limits: CropLimits) -> tuple[np.ndarray, list[str]]:
    """(photos rows to remove, targets that matched none): by path (file or folder) or by a file's content."""
    p = index.photos
    full = [os.path.join(r, ph) for r, ph in zip(p[ROOT], p[PHOTO], strict=True)]
    hit = np.zeros(len(p), bool)
    unmatched = []
    for target in targets:
        absolute = os.path.abspath(target)
        mine = np.array([f == absolute or f.startswith(absolute.rstrip(os.sep) + os.sep) for f in full], bool)
        mine |= (p[PHOTO] == target).to_numpy()
        if os.path.isfile(target):
            with contextlib.suppress(ImageRejected):
                mine |= (p[SHA256] == read_file(target, limits)[1]).to_numpy()
        if not mine.any():
            unmatched.append(target)
        hit |= mine
    return hit, unmatched


def remove(index_dir: str | os.PathLike, targets: Sequence[str], limits: CropLimits = LIMITS) -> Report:
    """Remove the photos ``targets`` name (see :func:`_targets`) and their faces."""
    folder = Path(index_dir)
    with writing(folder):
        old = load_index(folder)
        hit, unmatched = _targets(old, targets, limits)
        if not hit.any():
            return _report(old.faces, old.photos, unmatched=unmatched)
        gone = set(old.photos.loc[hit, SHA256])
        keep = ~old.faces[SHA256].isin(gone).to_numpy()
        faces = old.faces[keep].reset_index(drop=True)
        photo_table = old.photos[~hit].reset_index(drop=True)
        embeddings = np.ascontiguousarray(old.embeddings[keep])
        record = old.record | {"version": old.record["version"] + 1}
        graph = search_graph(embeddings, record, old, appended=False)  # HNSW cannot delete: rebuilt
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    return _report(faces, photo_table, removed_photos=int(hit.sum()), unmatched=unmatched, version=version)


def info(index_dir: str | os.PathLike) -> dict:
    """People, faces, photos, the model (and whether its file is still the same model), the threshold."""
    index = load_index(index_dir)
    own = index.record["model"]
    model: dict = {k: own[k] for k in ("path", "backbone", "fingerprint", "embedding_dim")}
    threshold = None
    try:
        embedder = Embedder.load(own["path"])
        model["file_matches"] = embedder.fingerprint == own["fingerprint"]
        if model["file_matches"]:
            threshold = verdict_record(verdict(embedder.payload, len(index.faces)))
    except PhotoIndexError:
        model["file_matches"] = None  # the file is gone
    p = index.photos
    people = sorted(index.faces[PERSON].dropna().unique())
    return {
        "index": str(index.folder), "version": index.version, "faces": len(index.faces),
        "photos": int((p[N_FACES] > 0).sum()), "photos_without_faces": dict(Counter(p[REASON].dropna())),
        "people": len(people), "names": people, "model": model, "threshold": threshold,
        "search": {"structure": index.record["structure"], "hnsw_threshold": index.record["hnsw_threshold"]},
    }  # fmt: skip


def info_lines(d: dict) -> list[str]:
    m, t = d["model"], d["threshold"]
    state = {True: "", False: " (the file there is now another model!)", None: " (the file is missing)"}
    names = ", ".join(d["names"][:10]) + (", ..." if len(d["names"]) > 10 else "")
    without = _counts(Counter(d["photos_without_faces"]))
    return [
        f"index: {d['index']} (version {d['version']})",
        f"people: {d['people']}" + (f" ({names})" if names else ""),
        f"faces: {d['faces']}",
        f"photos: {d['photos']} with faces" + (f"; without: {without}" if without else ""),
        f"model: {m['backbone']} {m['path']}{state[m['file_matches']]}, fingerprint {m['fingerprint'][:12]}",
        "threshold: " + (f"{t['similarity']:.4f} ({t['source']})" if t else "unknown (the model file is not there)"),
        *([t["meaning"]] + ([t["warning"]] if t["warning"] else []) if t else []),
        f"search: {d['search']['structure']} (HNSW from {d['search']['hnsw_threshold']} faces)",
    ]


def search(index_dir: str | os.PathLike, queries: Sequence[str], top: int = 9, threshold: float | None = None,
           model: str | None = None, limits: CropLimits = LIMITS) -> Iterator[dict]:  # fmt: skip
    """For each face of each query photo, the JSON-line object described in the module doc."""
    if top < 1:
        raise PhotoIndexError(f"--top must be at least 1, not {top}")
    index = load_index(index_dir)
    embedder = index.embedder(model)
    answer = verdict(embedder.payload, len(index.faces), threshold)
    cut = answer.similarity
    log.info("%s", answer.meaning())
    if answer.warning():
        log.warning("%s", answer.warning())
    structure = index.structure()
    f = index.faces
    where = [os.path.join(r, p) for r, p in zip(f[ROOT], f[PHOTO], strict=True)]
    for query in queries:
        try:
            _, boxes, crops, _ = file_faces(read_file(query, limits)[0], embedder.settings, limits)
            reason = None if boxes else Reason.NO_FACE.value
        except ImageRejected as exc:
            reason = str(exc.reason)
        except Exception as exc:  # a hostile query photo gets its line, like any other
            log.warning("%s: unexpected %s: %s", query, type(exc).__name__, exc)
            reason = Reason.ERROR.value
        if reason is not None:
            yield {"photo": query, "box": None, "verdict": "no_match", "reason": reason, "results": []}
            continue
        emb = embedder.embed(crops)
        if structure is None:
            dist, idx = np.zeros((len(emb), 0)), np.zeros((len(emb), 0), np.int64)
        else:
            dist, idx = structure.search(emb, top)
        for box, d, ix in zip(boxes, dist, idx, strict=True):
            sims = cosine_similarity(d)
            results = [{"rank": rank, "similarity": round(float(s), 6), "photo": where[i], "box": _box(f, i),
                        "name": None if pd.isna(f.at[i, PERSON]) else str(f.at[i, PERSON])}
                       for rank, (s, i) in enumerate(zip(sims, ix.tolist(), strict=True), start=1)]  # fmt: skip
            # "match" at similarity >= threshold: facesearch.verification's acceptance rule.
            said = "match" if len(sims) and sims[0] >= cut else "no_match"
            yield {"photo": query, "box": list(box), "verdict": said, "results": results}


def verdict_record(v: Verdict) -> dict:
    """A verdict as ``index info --json`` and ``search --json`` report it."""
    return {"similarity": v.similarity, "source": v.source, "fpir": v.fpir, "gallery_faces": v.gallery_faces,
            "calibrated_on": v.calibrated_on, "synthetic": v.synthetic, "meaning": v.meaning(),
            "warning": v.warning()}  # fmt: skip


def _box(faces: pd.DataFrame, i: int) -> list[int]:
    return [int(faces.at[i, c]) for c in (BOX_X, BOX_Y, BOX_W, BOX_H)]


def result_lines(line: dict) -> list[str]:
    if line["box"] is None:
        return [f"{line['photo']}: no usable face ({line['reason']})"]
    out = [f"{line['photo']} face at {line['box']}: {line['verdict'].replace('_', ' ')}"]
    for r in line["results"]:
        out.append(f"  {r['rank']:>3}  {r['similarity']:.3f}  {r['photo']}  {r['box']}" +
                   (f"  {r['name']}" if r["name"] else ""))  # fmt: skip
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
    a = cmds.add_parser("add", help="add the photos under a folder the index has not seen")
    a.add_argument("--index", required=True)
    a.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    a.add_argument("--model", default=None, help="the index's model, if it moved (another model is refused)")
    for p in (b, a):
        p.add_argument("--layout", choices=GALLERY_LAYOUTS, default="auto",
                       help="folders: <photos>/<person>/*.jpg names people; plain: no names; auto: folders when "
                            "every photo is one folder deep")  # fmt: skip
        p.add_argument("--device", default="cpu", help="where to embed (cpu, cuda, auto)")
    r = cmds.add_parser("remove", help="remove photos by path (file or folder) or by the content of a file")
    r.add_argument("--index", required=True)
    r.add_argument("--photos", required=True, nargs="+", metavar="PATH")
    i = cmds.add_parser("info", help="people, faces, photos, model and threshold of an index")
    i.add_argument("--index", required=True)
    i.add_argument("--json", action="store_true")
    s = sub.add_parser("search", help="find the faces of photos in an index")
    s.add_argument("--index", required=True)
    s.add_argument("photos", nargs="+", metavar="PHOTO")
    s.add_argument("--top", type=int, default=9, help="results per face (default %(default)s)")
    s.add_argument("--json", action="store_true", help="one JSON object per line and face")
    s.add_argument("--threshold", type=float, default=None, help="similarity for a match (default: the model's)")
    s.add_argument("--model", default=None, help="the index's model, if it moved (another model is refused)")


def main(args: argparse.Namespace) -> None:
    try:
        _run(args)
    except PhotoIndexError as exc:
        raise SystemExit(f"{args.command}: {exc}") from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "search":
        for line in search(args.index, args.photos, args.top, args.threshold, args.model):
            print(json.dumps(line) if args.json else "\n".join(result_lines(line)), flush=True)
        return
    cmd = args.index_command
    if cmd == "info":
        d = info(args.index)
        print(json.dumps(d) if args.json else "\n".join(info_lines(d)))
        return
    if cmd == "build":
        report = build(args.model, args.photos, args.out, args.layout, args.hnsw_threshold, args.force, args.device)
    elif cmd == "add":
        report = add(args.index, args.photos, args.layout, args.model, args.device)
    else:
        report = remove(args.index, args.photos)
    print("\n".join(report.lines()))
    if cmd == "remove" and report.unmatched and not report.removed_photos:
        sys.exit(1)
